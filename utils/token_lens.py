"""The token lens: how likely base and fine-tune found every token of a text, position by position.

Teacher-forced: each (text, model) pair is one row of ONE forward pass over prompt + text, the model chosen
per row by the adapter strength (0 = base, s = the fine-tune), so both panes scored by both models are four
rows of one batch. At every position the scores are the log-probability of the token that was written, the
top next tokens of each model, and KL(fine-tuned || base) of the two next-token distributions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

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
    forward_rows: Callable,
    decode: Callable[[list[int]], str],
    prompt_ids: list[int],
    texts: dict[str, list[int]],
    strength: float = 1.0,
    top: int = TOP_TOKENS,
    cap: int = MAX_SCORED_TOKENS,
) -> dict[str, ScoredText]:
    """Score every text (token ids written after the prompt) under the base and the fine-tune at `strength`.

    `forward_rows(sequences, strengths, keep_from)` is Engine.forward_rows: float32 logits [rows, positions,
    vocab], position j predicting token keep_from + j + 1. An empty text gives an empty token list.
    """
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
    sequences = [prompt_ids + kept[key] for key in keys for _ in (0, 1)]
    strengths = [s for _ in keys for s in (0.0, strength)]
    logits = forward_rows(sequences, strengths, len(prompt_ids) - 1)
    for i, key in enumerate(keys):
        ids = kept[key]
        n = len(ids)
        base = torch.log_softmax(logits[2 * i, :n].float(), dim=-1)
        tuned = torch.log_softmax(logits[2 * i + 1, :n].float(), dim=-1)
        index = torch.tensor(ids).unsqueeze(1)
        lp_base = base.gather(1, index).squeeze(1).tolist()
        lp_tuned = tuned.gather(1, index).squeeze(1).tolist()
        kl = (tuned.exp() * (tuned - base)).sum(dim=-1).clamp_min(0.0).tolist()
        top_base = _top(base, top, decode)
        top_tuned = _top(tuned, top, decode)
        scored[key].tokens = [
            ScoredToken(decode([t]), t, lp_base[j], lp_tuned[j], kl[j], top_base[j], top_tuned[j])
            for j, t in enumerate(ids)
        ]
    return scored


def _top(logprobs: torch.Tensor, k: int, decode) -> list[list[tuple[str, float]]]:
    values, indices = logprobs.topk(k, dim=-1)
    probs = values.exp().tolist()
    return [
        [(decode([t]), p) for t, p in zip(row_ids, row_p, strict=True)]
        for row_ids, row_p in zip(indices.tolist(), probs, strict=True)
    ]


def lens_json(scored: dict[str, ScoredText]) -> dict:
    """The /token_lens result: {"panes": {key: {"text", "tokens": [...], "logprob_base", "logprob_fine_tuned",
    "perplexity_base", "perplexity_fine_tuned", "cut_from"}}}."""
    panes = {}
    for key, text in scored.items():
        panes[key] = {
            "text": text.text,
            "tokens": [
                {
                    "token": t.token,
                    "token_id": t.token_id,
                    "logprob_base": t.logprob_base,
                    "logprob_fine_tuned": t.logprob_fine_tuned,
                    "kl": t.kl,
                    "top_base": [[s, p] for s, p in t.top_base],
                    "top_fine_tuned": [[s, p] for s, p in t.top_fine_tuned],
                }
                for t in text.tokens
            ],
            "logprob_base": text.logprob_base,
            "logprob_fine_tuned": text.logprob_fine_tuned,
            "perplexity_base": text.perplexity("base"),
            "perplexity_fine_tuned": text.perplexity("fine_tuned"),
            "cut_from": text.cut_from,
        }
    return {"panes": panes}


# ---------------------------------------------------------------------------------------------------
# Views (pure: HTML from escaped text, a matplotlib Figure, markdown)

LENS_CSS = """
.tl-legend { font-size: 0.85em; color: var(--body-text-color-subdued); margin-bottom: 6px; }
.tl-legend .sw { display: inline-block; width: 1.2em; height: 0.9em; vertical-align: middle; border-radius: 3px; }
.tl-pane { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 10px;
  margin-bottom: 8px; }
.tl-pane .title { font-weight: 600; margin-bottom: 4px; }
.tl-text { white-space: pre-wrap; overflow-wrap: anywhere; line-height: 1.9; font-family: var(--font-mono);
  font-size: 0.9em; }
.tl-tok { position: relative; border-radius: 3px; padding: 1px 0; cursor: help; outline: none; }
.tl-tok:hover, .tl-tok:focus { box-shadow: 0 0 0 2px var(--color-accent); }
.tl-tip { display: none; position: absolute; z-index: 60; top: 1.7em; left: 0; min-width: 330px;
  background: var(--background-fill-primary); color: var(--body-text-color); white-space: normal;
  border: 1px solid var(--border-color-primary); border-radius: 6px; padding: 6px 8px;
  box-shadow: 0 4px 14px rgba(0,0,0,.18); font-family: var(--font); font-size: 0.82em; line-height: 1.35; }
.tl-tok:hover .tl-tip, .tl-tok:focus .tl-tip { display: block; }
.tl-tip table { border-collapse: collapse; width: 100%; }
.tl-tip td, .tl-tip th { padding: 1px 6px; text-align: left; }
.tl-tip .num { text-align: right; }
.tl-note { font-size: 0.85em; color: var(--body-text-color-subdued); }
"""
FINE_TUNED_RGB = (79, 70, 229)  # indigo: the fine-tune found the token more likely
BASE_RGB = (217, 119, 6)  # orange: the base found it more likely
SATURATION_NATS = 6.0  # a log-probability shift this large gets the strongest colour


def _esc(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def _visible(token: str) -> str:
    """Whitespace-only tokens are shown so they can be hovered. Example: "\\n" -> "↵\\n"."""
    if token == "":
        return "∅"
    if token.isspace():
        return token.replace(" ", "␣").replace("\n", "↵\n").replace("\t", "⇥")
    return token


def token_colour(shift: float) -> str:
    """The background for a shift in log-probability. Example: token_colour(0.0) -> "transparent"."""
    strength = min(abs(shift) / SATURATION_NATS, 1.0) * 0.8
    if strength < 0.02:
        return "transparent"
    r, g, b = FINE_TUNED_RGB if shift > 0 else BASE_RGB
    return f"rgba({r}, {g}, {b}, {strength:.2f})"


def _tip(t: ScoredToken) -> str:
    rows = "".join(
        f"<tr><td>{_esc(_visible(b))}</td><td class='num'>{pb:.1%}</td>"
        f"<td>{_esc(_visible(f))}</td><td class='num'>{pf:.1%}</td></tr>"
        for (b, pb), (f, pf) in zip(t.top_base, t.top_fine_tuned, strict=True)
    )
    return (
        '<span class="tl-tip">'
        f"<b>{_esc(_visible(t.token))}</b> (id {t.token_id}): log p base {t.logprob_base:.2f}, "
        f"fine-tuned {t.logprob_fine_tuned:.2f}, shift {t.shift:+.2f}; KL {t.kl:.3f} nats"
        f"<table><tr><th>base top {len(t.top_base)}</th><th></th><th>fine-tuned top {len(t.top_fine_tuned)}</th>"
        f"<th></th></tr>{rows}</table></span>"
    )


def lens_html(scored: dict[str, ScoredText], labels: dict[str, str]) -> str:
    """Every pane's text as tokens coloured by log p_fine_tuned - log p_base, each with its hover card."""
    fine, base = (f"rgba({', '.join(map(str, c))}, 0.6)" for c in (FINE_TUNED_RGB, BASE_RGB))
    parts = [
        '<div class="tl-legend">'
        f'<span class="sw" style="background:{fine}"></span> the fine-tune found the token more likely '
        f'&nbsp; <span class="sw" style="background:{base}"></span> the base found it more likely '
        f"&nbsp; (stronger colour = larger difference in log-probability; full at {SATURATION_NATS:g} nats). "
        "Hover over or select a token for both models' top next tokens there.</div>"
    ]
    for key, text in scored.items():
        spans = "".join(
            f'<span class="tl-tok" tabindex="0" style="background:{token_colour(t.shift)}">'
            f"{_esc(_visible(t.token))}{_tip(t)}</span>"
            for t in text.tokens
        )
        if not text.tokens:
            spans = '<span class="tl-note">(empty: this pane wrote no tokens)</span>'
        note = (
            f'<div class="tl-note">Only the first {MAX_SCORED_TOKENS} of {text.cut_from} tokens are scored.</div>'
            if text.cut_from
            else ""
        )
        parts.append(
            f'<div class="tl-pane" data-pane="{_esc(key)}"><div class="title">{_esc(labels.get(key, key))}'
            f'</div><div class="tl-text">{spans}</div>{note}</div>'
        )
    return "".join(parts)


def summary_markdown(scored: dict[str, ScoredText], labels: dict[str, str]) -> str:
    """Per text: total log-probability and perplexity under each model, and what that means in words."""
    lines = [
        "| Text | Tokens | log p under base | log p under fine-tuned | Perplexity base | Perplexity fine-tuned |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    sentences = []
    for key, text in scored.items():
        n = len(text.tokens)
        if not n:
            lines.append(f"| {labels.get(key, key)} | 0 | – | – | – | – |")
            continue
        lines.append(
            f"| {labels.get(key, key)} | {n} | {text.logprob_base:.2f} | {text.logprob_fine_tuned:.2f} | "
            f"{text.perplexity('base'):.2f} | {text.perplexity('fine_tuned'):.2f} |"
        )
        sentences.append(
            f"The base would have written the {labels.get(key, key).split(' (')[0].lower()} text with "
            f"probability {_probability(text.logprob_base)}, the fine-tune with "
            f"{_probability(text.logprob_fine_tuned)}."
        )
    return "\n".join(lines + [""] + sentences)


def _probability(logprob: float) -> str:
    """A probability from its natural log, readable however small. Example: _probability(-2.302585) -> "0.1"."""
    if logprob > -6.9:
        return f"{math.exp(logprob):.3g}"
    exponent = logprob / math.log(10)
    mantissa = 10 ** (exponent - math.floor(exponent))
    return f"{mantissa:.2f}e{math.floor(exponent)}"


def kl_figure(scored: dict[str, ScoredText], labels: dict[str, str]):
    """KL(fine-tuned || base) along each text: where the adapter acts. A matplotlib Figure (no pyplot)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.4), layout="constrained")
    axis = figure.subplots()
    colours = {"base": "#8c8c8c", "fine_tuned": "#4f46e5"}
    for key, text in scored.items():
        if text.tokens:
            axis.plot(
                range(len(text.tokens)),
                [t.kl for t in text.tokens],
                marker="o",
                markersize=3,
                linewidth=1.2,
                color=colours.get(key),
                label=f"along the {labels.get(key, key).split(' (')[0].lower()} text",
            )
    axis.set_xlabel("token position in the generated text")
    axis.set_ylabel("KL (nats)")
    axis.set_title("KL(fine-tuned || base) of the next-token distributions: where the adapter acts")
    axis.grid(True, alpha=0.25)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)
    return figure
