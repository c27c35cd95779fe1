"""What the engine hands transformers' generate(): a streamer for every row, a stop on an event, and no EOS
for benchmarks; plus the engine's error mapping."""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, StoppingCriteria

from utils.core.errors import GenerationError, InputError


class StopOnEvent(StoppingCriteria):
    """Ends generation for every row once the event is set (Stop button, disconnect, timeout)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class NoEndOfSequence(LogitsProcessor):
    """Rules out the end-of-sequence tokens (`ignore_eos`): what `min_new_tokens` does, without the vocabulary-
    wide mask it builds on every step (about half a millisecond a step on a CPU, for 49,152 tokens)."""

    def __init__(self, eos_ids: list[int]):
        self.eos_ids = list(eos_ids)
        self._index = None

    def __call__(self, input_ids, scores):
        # a new tensor: the one handed in is also what generate() returns as the step's raw logits
        # (output_logits), which the token lens reads (utils/runtime/kept_run.py)
        return scores.index_fill(1, self.index_for(scores.device), -math.inf)

    def index_for(self, device):
        if self._index is None or self._index.device != device:
            self._index = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        return self._index


class RowStreamer:
    """transformers' streamers accept one row; this one hands each step's tokens for all rows to a queue."""

    def __init__(self, out: queue.Queue):
        self.out = out
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first sends the prompt ids
            self.prompt_seen = True
            return
        self.out.put(("tokens", value.reshape(-1).tolist()))

    def end(self) -> None:
        self.out.put(("end", None))


def as_generation_error(exc: BaseException) -> GenerationError:
    if isinstance(exc, GenerationError):
        return exc
    if isinstance(exc, InputError):
        return GenerationError(str(exc))
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "out of memory" in text:
        return GenerationError("Generation ran out of memory: try fewer new tokens or a shorter prompt.")
    return GenerationError(
        f"Generation failed ({type(exc).__name__}); the model is free again, try once more."
    )


def eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    return [int(i) for i in ids if i is not None] or [0]


def separate_greedy_texts(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 6
) -> dict[str, list[str]]:
    """The greedy continuations of each pane run on its own (base under disable_adapter()), for checking
    that the mixed batch routes rows correctly."""
    encoded = tokenizer(
        list(prompts), return_tensors="pt", padding=True, padding_side="left", add_special_tokens=True
    )
    device = next(model.parameters()).device
    encoded = {key: value.to(device) for key, value in encoded.items()}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    with torch.no_grad():
        with model.disable_adapter():
            base = model.generate(**encoded, **kwargs)
        tuned = model.generate(**encoded, **kwargs)
    width = encoded["input_ids"].shape[1]
    decode = lambda seqs: tokenizer.batch_decode(seqs[:, width:], skip_special_tokens=True)  # noqa: E731
    return {"base": decode(base), "fine-tuned": decode(tuned)}


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of rows of different lengths, padded on the left so every row's next token
    comes at the same column; generate() takes each row's positions from the mask. Rows of one length have no
    pads, and the mask is all ones."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, width - len(ids) :] = 1
    return input_ids, attention_mask
