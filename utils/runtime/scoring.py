"""What the engine makes of logits for the seam: teacher-forced scores (log-probabilities, top candidates, KL
between rows), next-token views, and an evaluation chunk's greedy answers with their first candidates. Plain
values out (lists of ids and probabilities), never the vocabulary-wide tensors.
"""

from __future__ import annotations

import torch

from utils.core.seam import ChunkAnswer, NextTokenView, Scores, SequenceScores
from utils.runtime.router import row_strengths


def teacher_forced_logits(
    model, threads: int, pad_id: int, sequences, placed, first_kept: int, past=None, past_length: int = 0
) -> torch.Tensor:
    """One forward pass over right-padded rows at their strengths (`placed`: Engine.placement), on `threads` CPU
    threads of their own, after `past()` (a cache of `past_length` tokens for every row) where given: float32
    logits on the CPU, [rows, longest - first_kept, vocab], position j predicting the token at first_kept + j + 1
    (positions counted after the cache). Right padding keeps every row's positions as in an unpadded run; pads
    come after the real tokens, so the causal mask hides them from every real position. The caller holds the
    model's lock; a failure comes back as a GenerationError."""
    from utils.core.errors import InputError
    from utils.runtime.generation import as_generation_error
    from utils.runtime.threads import in_own_thread

    width = max(len(seq) for seq in sequences)
    device = next(model.parameters()).device
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), past_length + width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : past_length + len(seq)] = 1

    def forward():
        cache = {} if past is None else {"past_key_values": past(), "use_cache": True}
        with row_strengths(model, *placed), torch.inference_mode():
            out = model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                logits_to_keep=width - first_kept,
                **cache,
            )
        return out.logits.float().cpu()

    try:
        return in_own_thread(threads, forward)
    except InputError:
        raise
    except Exception as exc:
        raise as_generation_error(exc) from exc


def scores_from_logits(
    row_logits: list[torch.Tensor],
    sequences,
    keep_from: list[int],
    top_k: int,
    kl_pairs,
    fused: bool | None = None,
) -> Scores:
    """Backend.score_rows from each row's logits ([len(sequence) - 1 - keep_from, vocab], position j predicting
    token keep_from + j + 1): KL(a || b) = sum p_a (log p_a - log p_b) per position, for each pair (a, b) (rows
    of equal scored lengths). The kernel library's loops where it is loaded and `fused` is not False
    (csrc/lens_scores.cpp: the same values up to the last bits, without writing out vocabulary-wide
    log-softmaxes), else ATen's operations."""
    targets = [
        torch.tensor(seq[keep + 1 :], dtype=torch.long)
        for seq, keep in zip(sequences, keep_from, strict=True)
    ]
    logits = [z.float() for z in row_logits]
    if fused is not False and fused_scores_serve(logits):
        return _fused_scores_from_logits(logits, targets, top_k, kl_pairs)
    logprobs = [torch.log_softmax(z, dim=-1) for z in logits]
    rows = []
    for index, lp in zip(targets, logprobs, strict=True):
        top = []
        if top_k:
            values, ids = lp.topk(top_k, dim=-1)
            top = _candidates(ids, values.exp())
        rows.append(SequenceScores(lp.gather(1, index.unsqueeze(1)).squeeze(1).tolist(), top))
    kl = {
        (a, b): (logprobs[a].exp() * (logprobs[a] - logprobs[b])).sum(dim=-1).clamp_min(0.0).tolist()
        for a, b in kl_pairs
    }
    return Scores(rows, kl)


def fused_scores_serve(logits: list[torch.Tensor]) -> bool:
    """Whether csrc/lens_scores.cpp's loops take these rows: the library loaded, float32 [positions, vocabulary]
    rows on the CPU, each position's logits contiguous."""
    return hasattr(torch.ops.lora_lens, "row_scores") and all(
        z.device.type == "cpu" and z.dim() == 2 and z.shape[0] > 0 and z.stride(1) == 1 for z in logits
    )


def _fused_scores_from_logits(logits, targets, top_k: int, kl_pairs) -> Scores:
    rows, norms = [], []
    for z, index in zip(logits, targets, strict=True):
        norm, logprobs, top_logprobs, top_ids = torch.ops.lora_lens.row_scores(z, index, top_k)
        norms.append(norm)
        top = _candidates(top_ids, top_logprobs.exp()) if top_k else []
        rows.append(SequenceScores(logprobs.tolist(), top))
    kl = {
        (a, b): torch.ops.lora_lens.kl_rows(logits[a], norms[a], logits[b], norms[b]).clamp_min(0.0).tolist()
        for a, b in kl_pairs
    }
    return Scores(rows, kl)


def _candidates(ids: torch.Tensor, probabilities: torch.Tensor) -> list[list[tuple[int, float]]]:
    return [list(zip(i, p, strict=True)) for i, p in zip(ids.tolist(), probabilities.tolist(), strict=True)]


def top_view(tokenizer, key: str, logits: torch.Tensor, top_k: int) -> NextTokenView:
    """The top_k next tokens of one row's logits, probabilities from the softmax over the whole vocabulary."""
    p, idx = torch.softmax(logits.float(), dim=-1).topk(top_k)
    token_ids = idx.tolist()
    return NextTokenView(key, [tokenizer.decode([t]) for t in token_ids], token_ids, p.tolist())


def generate_chunk(
    model, tokenizer, prompts, placed: tuple[list, list], max_new_tokens: int, top_k: int
) -> list[list[ChunkAnswer]]:
    """Every prompt under every (strength, adapter) of `placed` (Engine.placement) in one greedy generate():
    rows [prompts under the first, ...], left padded; each row's first-step logits (those of its last prompt
    position) give its next-token candidates. The caller holds the model's lock."""
    strengths, adapters = placed
    encoded = tokenizer(
        list(prompts), return_tensors="pt", padding=True, padding_side="left", add_special_tokens=True
    )
    device = next(model.parameters()).device
    input_ids = torch.cat([encoded["input_ids"]] * len(strengths)).to(device)
    attention_mask = torch.cat([encoded["attention_mask"]] * len(strengths)).to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    row_list = [s for s in strengths for _ in prompts]
    row_adapters = [a for a in adapters for _ in prompts]
    with row_strengths(model, row_list, row_adapters), torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    texts = tokenizer.batch_decode(out.sequences[:, input_ids.shape[1] :], skip_special_tokens=True)
    first = out.logits[0].float().cpu()
    n = len(prompts)
    return [
        [
            ChunkAnswer(texts[p * n + i], top_view(tokenizer, str(i), first[p * n + i], top_k))
            for i in range(n)
        ]
        for p in range(len(strengths))
    ]
