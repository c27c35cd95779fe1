"""The token lens: how likely base and fine-tune found every token of a text, position by position.

Teacher-forced: each (text, model) pair is one row of ONE forward pass over prompt + text, the model chosen
per row by the adapter strength (0 = base, s = the fine-tune), so both panes scored by both models are four
rows of one batch. At every position the scores are the log-probability of the token that was written, the
top next tokens of each model, and KL(fine-tuned || base) of the two next-token distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from utils.core.row_prompts import prompt_of
from utils.core.seam import BASE, FINE_TUNED, Backend

MAX_SCORED_TOKENS = 256  # tokens scored per text; a longer text is cut, and the result says so
TOP_TOKENS = 5  # next-token candidates shown per position and model


@dataclass(frozen=True)
class ScoredToken:
    """One written token and how the two models saw it."""

    token: str  # the token's text as decoded on its own
    token_id: int
    logprob_base: float  # natural-log probability under the base, given everything before it
    logprob_fine_tuned: float  # the same under the fine-tune
    kl: float  # KL(fine-tuned || base) of the next-token distributions at this position, in nats
    top_base: list[tuple[str, float]]  # the base's most likely tokens here, with probabilities
    top_fine_tuned: list[tuple[str, float]]

    @property
    def shift(self) -> float:
        """log p_fine_tuned - log p_base: > 0 where the fine-tune prefers the token."""
        return self.logprob_fine_tuned - self.logprob_base


@dataclass
class ScoredText:
    """One pane's text scored by both models."""

    key: str  # the pane ("base" or "fine_tuned")
    text: str
    tokens: list[ScoredToken] = field(default_factory=list)
    cut_from: int | None = None  # the text had this many tokens and only the first MAX_SCORED_TOKENS count

    @property
    def logprob_base(self) -> float:
        return sum(t.logprob_base for t in self.tokens)

    @property
    def logprob_fine_tuned(self) -> float:
        return sum(t.logprob_fine_tuned for t in self.tokens)

    def perplexity(self, model: str) -> float | None:
        """exp(-mean log p) under "base" or "fine_tuned"; None for an empty text."""
        if not self.tokens:
            return None
        total = self.logprob_base if model == "base" else self.logprob_fine_tuned
        return math.exp(-total / len(self.tokens))


def score_texts(
    backend: Backend,
    prompt_ids: list[int] | dict[str, list[int]],
    texts: dict[str, list[int]],
    strength: float = 1.0,
    top: int = TOP_TOKENS,
    cap: int = MAX_SCORED_TOKENS,
) -> dict[str, ScoredText]:
    """Score every text (token ids written after the prompt) under the base and the fine-tune at `strength`.

    One Backend.score_rows call: for each text a base row (s = 0) and a fine-tune row (s = strength), with
    KL(fine-tuned || base) per position from each pair. An empty text gives an empty token list. Where the
    panes were given different prompt formats, `prompt_ids` maps "base" and "fine_tuned" to each one's prompt,
    and each model reads every text after its own.
    """
    decode = backend.decode
    scored = {key: ScoredText(key, decode(ids)) for key, ids in texts.items()}
    kept = {}
    for key, ids in texts.items():
        if len(ids) > cap:
            scored[key].cut_from = len(ids)
        if ids:
            kept[key] = list(ids[:cap])
    if not kept:
        return scored
    keys = list(kept)
    prompts = [prompt_of(prompt_ids, model) for model in (BASE, FINE_TUNED)]
    sequences = [prompts[m] + kept[key] for key in keys for m in (0, 1)]
    keep_from = [len(prompts[m]) - 1 for _ in keys for m in (0, 1)]
    strengths = [s for _ in keys for s in (0.0, strength)]
    pairs = [(2 * i + 1, 2 * i) for i in range(len(keys))]
    scores = backend.score_rows(sequences, strengths, keep_from, top, pairs)
    for i, key in enumerate(keys):
        base, tuned, kl = scores.rows[2 * i], scores.rows[2 * i + 1], scores.kl[pairs[i]]
        top_base, top_tuned = _named(base.top, decode), _named(tuned.top, decode)
        scored[key].tokens = [
            ScoredToken(decode([t]), t, base.logprobs[j], tuned.logprobs[j], kl[j], top_base[j], top_tuned[j])
            for j, t in enumerate(kept[key])
        ]
    return scored


def _named(top: list[list[tuple[int, float]]], decode) -> list[list[tuple[str, float]]]:
    return [[(decode([t]), p) for t, p in position] for position in top]
