"""What the training loop feeds the model: the learning-rate schedule, a batch order that is a pure function of
(seed, step), each catalog item as prompt + completion token ids with the loss on the price and EOS only,
left-padded batches, and the completion loss.
"""

from __future__ import annotations

import math
import random

from utils.core.errors import InputError
from utils.task.catalog import CatalogItem
from utils.task.pricing import build_prompt

IGNORE_INDEX = -100  # label value the loss skips (prompt and padding positions)


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Multiplier of the peak learning rate before optimizer step `step` (0-based): warmup, then cosine.

    Example: lr_factor(0, 100, 10) = 0.1; lr_factor(9, 100, 10) = 1.0; lr_factor(99, 100, 10) ~= 0.1003
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Example indices of 0-based `step`: epochs are seeded permutations laid end to end.

    A pure function of its arguments, so a resumed run sees exactly the batches it would have seen.
    Example: batch_indices(0, 4, 10, 1) and batch_indices(1, 4, 10, 1) hold 8 distinct indices in 0..9
    """
    out: list[int] = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        take = min(batch_size - len(out), n - offset)
        out.extend(order[offset : offset + take])
        position += take
    return out


def completion_text(price: float) -> str:
    """The target after "Price is $": the price rounded to whole dollars.

    Example: completion_text(149.49) == "149"; completion_text(0.6) == "1"
    """
    return str(max(1, int(round(price))))


def encode_example(
    item: CatalogItem, tokenizer, template: str, max_length: int
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one item: prompt + price + EOS, labels IGNORE_INDEX on the prompt.

    Prompt and completion are tokenized separately, as at inference where the prompt is tokenized alone.
    """
    # The prompt with the tokenizer's BOS where it adds one, exactly as the engine encodes it at inference.
    prompt_ids = tokenizer(build_prompt(item.description, template))["input_ids"]
    completion_ids = tokenizer(completion_text(item.price), add_special_tokens=False)["input_ids"]
    completion_ids = [*completion_ids, tokenizer.eos_token_id]
    keep = max_length - len(completion_ids)
    if keep < 1:
        raise InputError(f"--max-length {max_length} leaves no room for the prompt.")
    prompt_ids = prompt_ids[-keep:]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Left-pad a batch, as at inference: input_ids, attention_mask, position_ids, labels, keep.

    Left padding puts every completion at the end, so only the last `keep` positions need logits (the
    lm_head over 49,152 tokens is a fifth of the model's work per position). Position ids count real
    tokens only, as generate() does with a left-padded batch.
    """
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        labels[row, width - len(labs) :] = torch.tensor(labs)
        mask[row, width - len(ids) :] = 1
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    completion = max(sum(1 for x in labs if x != IGNORE_INDEX) for _, labs in examples)
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "position_ids": position_ids,
        "labels": labels,
        "keep": min(width, completion + 1),
    }


def completion_loss(model, batch: dict):
    """Mean cross-entropy over the completion tokens, computing logits for the last `keep` positions only.

    Logits at position i predict token i + 1, so the kept logits but the last are scored against the
    labels of the last keep - 1 positions; the result equals the loss of `model(..., labels=labels)`.
    """
    import torch

    keep = batch["keep"]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=keep,
    )
    logits = out.logits[:, :-1, :].float()
    targets = batch["labels"][:, batch["labels"].shape[1] - keep + 1 :]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def lora_param_count(model) -> int:
    """Trainable (LoRA) parameters of a PeftModel; 3,686,400 for SmolLM2-135M at r=32 on q/k/v/o.

    Example: per layer r x (in + out) per matrix: 32 x (1152 + 768 + 768 + 1152) = 122,880; x 30 layers
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def validation_loss(model, batches) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        losses = [completion_loss(model, batch).item() for batch in batches]
    model.train()
    return sum(losses) / len(losses)
