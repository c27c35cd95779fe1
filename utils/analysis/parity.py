"""Serving parity: does the served fine-tune (a vLLM server) behave as the in-process reference of the same
adapter? For a prompt, each pane (base and fine-tuned) generates greedily on both backends; each pane's served
text is then scored teacher-forced on both, token by token, and so is the reference's text where it differs.
The figures: whether the greedy outputs match (and where they first part), the largest and mean difference of
the per-token log-probabilities (served minus reference, nats), and the tokens where it is largest. Over a
set of evaluation items the same, summed up per pane.

A QLoRA adapter trained on a 4-bit base and served on a bf16 base (the usual deployment) shows its cost here:
the reference is what the app holds (NF4 by default), the server holds what it was started with.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from utils.core.seam import BASE, FINE_TUNED, GenerationSettings, first_divergence

TOP_TOKENS = 5  # the tokens listed where the difference is largest


@dataclass(frozen=True)
class TokenGap:
    position: int  # index in the scored text
    token: str
    token_id: int
    reference: float  # log p under the reference (nats)
    served: float  # log p under the served model

    @property
    def gap(self) -> float:
        return self.served - self.reference


@dataclass
class PaneParity:
    """One pane (the base, or the fine-tune) on both backends."""

    key: str
    reference_text: str
    served_text: str
    greedy_match: bool
    first_divergence: int | None  # token index where the greedy outputs part, None when equal
    tokens_scored: int
    max_gap: float  # the largest |log p_served - log p_reference| over the scored tokens, nats
    mean_gap: float
    largest: list[TokenGap] = field(default_factory=list)


@dataclass
class Parity:
    prompt_tokens: int
    max_new_tokens: int
    reference: str  # the backends' names
    served: str
    panes: dict[str, PaneParity]

    def as_json(self) -> dict:
        out = asdict(self)
        for key, pane in self.panes.items():
            out["panes"][key]["largest"] = [{**asdict(t), "gap": t.gap} for t in pane.largest]
        return out


def pane_rows(backend) -> list:
    """The rows parity compares: the base, and the fine-tune where an adapter is loaded."""
    return backend.rows_for("both" if backend.has_adapter else "base")


def check_prompt(reference, served, prompt: str, max_new_tokens: int) -> Parity:
    """Both panes of one prompt on both backends (see the module docstring)."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    rows = pane_rows(reference)
    ref_run = reference.run_rows(prompt, rows, settings)
    served_run = served.run_rows(prompt, rows, settings)
    prompt_ids, _ = reference.encode(prompt, max_new_tokens)
    panes = {}
    for row in rows:
        ref_ids = ref_run.panes[row.key].token_ids
        served_ids = served_run.panes[row.key].token_ids
        texts = [served_ids] + ([ref_ids] if ref_ids != served_ids else [])
        gaps = []
        for ids in texts:
            if not ids:
                continue
            sequence, keep = prompt_ids + ids, len(prompt_ids) - 1
            under_ref = reference.score_rows([sequence], [row], keep).rows[0].logprobs
            under_served = served.score_rows([sequence], [row], keep).rows[0].logprobs
            gaps += [
                TokenGap(j, reference.decode([t]), t, a, b)
                for j, (t, a, b) in enumerate(zip(ids, under_ref, under_served, strict=True))
            ]
        sizes = [abs(g.gap) for g in gaps]
        panes[row.key] = PaneParity(
            key=row.key,
            reference_text=ref_run.panes[row.key].text,
            served_text=served_run.panes[row.key].text,
            greedy_match=ref_ids == served_ids,
            first_divergence=first_divergence(ref_ids, served_ids),
            tokens_scored=len(gaps),
            max_gap=max(sizes, default=0.0),
            mean_gap=math.fsum(sizes) / len(sizes) if sizes else 0.0,
            largest=sorted(gaps, key=lambda g: -abs(g.gap))[:TOP_TOKENS],
        )
    return Parity(len(prompt_ids), max_new_tokens, reference.info.name, served.info.name, panes)


@dataclass
class ItemsParity:
    """Parity over evaluation items: per pane, how many greedy answers match and the gaps over all of them."""

    items: int
    matches: dict[str, int]
    max_gap: dict[str, float]
    mean_gap: dict[str, float]
    per_item: list[dict]

    def as_json(self) -> dict:
        return asdict(self)


def check_items(reference, served, prompts: list[str], max_new_tokens: int) -> ItemsParity:
    """check_prompt over each prompt (the task's evaluation items), summed up per pane."""
    per_item, matches, gaps, means = [], {}, {}, {}
    for i, prompt in enumerate(prompts):
        result = check_prompt(reference, served, prompt, max_new_tokens)
        for key, pane in result.panes.items():
            matches[key] = matches.get(key, 0) + int(pane.greedy_match)
            gaps[key] = max(gaps.get(key, 0.0), pane.max_gap)
            means.setdefault(key, []).append(pane.mean_gap)
        per_item.append(
            {
                "item": i,
                **{f"{key}_match": pane.greedy_match for key, pane in result.panes.items()},
                **{f"{key}_max_gap": pane.max_gap for key, pane in result.panes.items()},
                "reference_fine_tuned": result.panes.get(FINE_TUNED, result.panes[BASE]).reference_text,
                "served_fine_tuned": result.panes.get(FINE_TUNED, result.panes[BASE]).served_text,
            }
        )
    mean = {key: math.fsum(v) / len(v) for key, v in means.items()}
    return ItemsParity(len(prompts), matches, gaps, mean, per_item)
