"""The token lens over a set of panes: every pane's text scored under every pane's model, in one batch.

Teacher-forced like the two-pane lens (utils/analysis/token_lens.py): row (text t, model m) is prompt + t
under m (the base, or an adapter at a strength); a base row is added per text where no pane shows the base,
so each model's KL against the base is there too. Per text and model: the log-probability of each token; per
text: KL(model || base) per position for every model, and KL(a || b) for one chosen pair, whose view reuses
the two-pane lens's colouring (log p_a − log p_b, both models' top tokens on hover).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from utils.analysis.token_lens import MAX_SCORED_TOKENS, TOP_TOKENS, ScoredText, ScoredToken
from utils.core.errors import InputError
from utils.core.row_prompts import prompt_of
from utils.core.seam import Backend, Use

REFERENCE = "__base__"  # the hidden base model's key where no pane shows the base


@dataclass
class PaneLens:
    """Each text under each model; keys are the panes' row keys."""

    labels: dict[str, str]  # pane key -> label
    texts: dict[str, str]  # pane key -> its text
    logprobs: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (text, model) -> per token
    kl_vs_base: dict[tuple[str, str], list[float]] = field(
        default_factory=dict
    )  # (text, model) -> per position
    pair: tuple[str, str] | None = None  # (a, b): the pair compared token by token
    pair_view: dict[str, ScoredText] = field(
        default_factory=dict
    )  # text -> scored as "fine_tuned"=a, "base"=b
    cut_from: dict[str, int] = field(default_factory=dict)  # text -> its token count where cut to the cap

    @property
    def keys(self) -> list[str]:
        return list(self.labels)

    def total(self, text: str, model: str) -> float | None:
        """log p(text | prompt) under the model (natural log); None for an empty text."""
        values = self.logprobs.get((text, model))
        return math.fsum(values) if values else None

    def mean_kl(self, model: str) -> float | None:
        """KL(model || base) per token, over every text's positions."""
        values = [v for (_, m), kl in self.kl_vs_base.items() if m == model for v in kl]
        return sum(values) / len(values) if values else None


def score_panes(
    backend: Backend,
    prompt_ids: list[int] | dict[str, list[int]],
    texts: dict[str, list[int]],
    models: dict[str, Use],
    labels: dict[str, str],
    pair: tuple[str, str] | None = None,
    cap: int = MAX_SCORED_TOKENS,
    top: int = TOP_TOKENS,
) -> PaneLens:
    """Score every text under every model (both keyed by pane) in one Backend.score_rows call. `prompt_ids` is
    the shared prompt, or each pane's own (its prompt format) keyed by pane: each model reads every text after
    its own pane's prompt (the base added as a reference reads the first pane's)."""
    if pair is not None and not set(pair) <= set(models):
        raise InputError("The pair compared token by token must be two of the panes shown.")
    decode = backend.decode
    lens = PaneLens(dict(labels), {key: decode(ids) for key, ids in texts.items()}, pair=pair)
    kept = {}
    for key, ids in texts.items():
        if len(ids) > cap:
            lens.cut_from[key] = len(ids)
        if ids:
            kept[key] = list(ids[:cap])
    if not kept:
        return lens
    base_key = next((key for key, use in models.items() if _is_base(use)), None)
    scored_models = dict(models) if base_key is not None else {**models, REFERENCE: Use(None, 0.0)}
    base_key = base_key or REFERENCE
    rows, sequences, uses, keep_from = {}, [], [], []
    for text in kept:
        for model, use in scored_models.items():
            prompt = prompt_of(prompt_ids, model)
            rows[(text, model)] = len(sequences)
            sequences.append(prompt + kept[text])
            keep_from.append(len(prompt) - 1)
            uses.append(use)
    pairs = [(rows[(t, m)], rows[(t, base_key)]) for t in kept for m in scored_models if m != base_key]
    if pair is not None and pair[1] != base_key:
        pairs += [(rows[(t, pair[0])], rows[(t, pair[1])]) for t in kept if pair[0] != pair[1]]
    scores = backend.score_rows(sequences, uses, keep_from, top, list(dict.fromkeys(pairs)))
    for (text, model), row in rows.items():
        lens.logprobs[(text, model)] = scores.rows[row].logprobs
        if model != base_key:
            lens.kl_vs_base[(text, model)] = scores.kl[(row, rows[(text, base_key)])]
        else:
            lens.kl_vs_base[(text, model)] = [0.0] * len(scores.rows[row].logprobs)
    if pair is not None:
        a, b = pair
        for text, ids in kept.items():
            row_a, row_b = scores.rows[rows[(text, a)]], scores.rows[rows[(text, b)]]
            kl = scores.kl.get((rows[(text, a)], rows[(text, b)]), [0.0] * len(ids))
            top_a, top_b = _named(row_a.top, decode), _named(row_b.top, decode)
            view = ScoredText(text, lens.texts[text], cut_from=lens.cut_from.get(text))
            view.tokens = [
                ScoredToken(decode([t]), t, row_b.logprobs[j], row_a.logprobs[j], kl[j], top_b[j], top_a[j])
                for j, t in enumerate(ids)
            ]
            lens.pair_view[text] = view
    lens.logprobs = {k: v for k, v in lens.logprobs.items() if k[1] != REFERENCE}
    lens.kl_vs_base = {k: v for k, v in lens.kl_vs_base.items() if k[1] != REFERENCE}
    return lens


def _is_base(use: Use) -> bool:
    return use.adapter is None or (isinstance(use.strength, (int, float)) and float(use.strength) == 0.0)


def _named(top, decode):
    return [[(decode([t]), p) for t, p in position] for position in top]


def lens_json(lens: PaneLens) -> dict:
    """The API's shape: per pane its text, and its log-probability and KL against the base under each model."""
    keys = lens.keys
    return {
        "panes": [
            {
                "label": lens.labels[text],
                "text": lens.texts[text],
                "cut_from": lens.cut_from.get(text),
                "logprob_under": {lens.labels[m]: lens.total(text, m) for m in keys},
                "tokens": [
                    {
                        "token": token.token,
                        "token_id": token.token_id,
                        "logprob_under": {lens.labels[m]: lens.logprobs[(text, m)][j] for m in keys},
                        "kl_vs_base": {lens.labels[m]: lens.kl_vs_base[(text, m)][j] for m in keys},
                    }
                    for j, token in enumerate(lens.pair_view[text].tokens)
                ]
                if text in lens.pair_view
                else [],
            }
            for text in keys
        ],
        "kl_vs_base": {lens.labels[m]: lens.mean_kl(m) for m in keys},
        "pair": (
            {
                "a": lens.labels[lens.pair[0]],
                "b": lens.labels[lens.pair[1]],
                "kl_a_b": _mean_pair_kl(lens),
            }
            if lens.pair
            else None
        ),
    }


def _mean_pair_kl(lens: PaneLens) -> float | None:
    values = [t.kl for view in lens.pair_view.values() for t in view.tokens]
    return sum(values) / len(values) if values else None
