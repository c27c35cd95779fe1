"""The token lens's views: every token coloured by how much more likely the fine-tune found it than the base,
a card per token with both models' top next tokens, the totals, the KL chart, and the /token_lens JSON.

Pure functions: HTML from escaped text, markdown, a matplotlib Figure.
"""

from __future__ import annotations

import html
import math

from utils.analysis.token_lens import MAX_SCORED_TOKENS, ScoredText, ScoredToken


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


def _tip(t: ScoredToken, a: str = "fine-tuned", b: str = "base") -> str:
    rows = "".join(
        f"<tr><td>{_esc(_visible(b))}</td><td class='num'>{pb:.1%}</td>"
        f"<td>{_esc(_visible(f))}</td><td class='num'>{pf:.1%}</td></tr>"
        for (b, pb), (f, pf) in zip(t.top_base, t.top_fine_tuned, strict=True)
    )
    return (
        '<span class="tl-tip">'
        f"<b>{_esc(_visible(t.token))}</b> (id {t.token_id}): log p {_esc(b)} {t.logprob_base:.2f}, "
        f"{_esc(a)} {t.logprob_fine_tuned:.2f}, shift {t.shift:+.2f}; KL {t.kl:.3f} nats"
        f"<table><tr><th>{_esc(b)} top {len(t.top_base)}</th><th></th><th>{_esc(a)} top {len(t.top_fine_tuned)}</th>"
        f"<th></th></tr>{rows}</table></span>"
    )


def lens_html(
    scored: dict[str, ScoredText], labels: dict[str, str], models: tuple[str, str] = ("fine-tuned", "base")
) -> str:
    """Every pane's text as tokens coloured by log p_a - log p_b (a: the fine-tune, b: the base, unless
    `models` names two others, whose scores sit in the fine-tuned and base fields), each with its hover card."""
    fine, base = (f"rgba({', '.join(map(str, c))}, 0.6)" for c in (FINE_TUNED_RGB, BASE_RGB))
    a, b = models
    who_a = "the fine-tune" if a == "fine-tuned" else _esc(a)
    who_b = "the base" if b == "base" else _esc(b)
    parts = [
        '<div class="tl-legend">'
        f'<span class="sw" style="background:{fine}"></span> {who_a} found the token more likely '
        f'&nbsp; <span class="sw" style="background:{base}"></span> {who_b} found it more likely '
        f"&nbsp; (stronger colour = larger difference in log-probability; full at {SATURATION_NATS:g} nats). "
        "Hover over or select a token for both models' top next tokens there.</div>"
    ]
    for key, text in scored.items():
        spans = "".join(
            f'<span class="tl-tok" tabindex="0" style="background:{token_colour(t.shift)}">'
            f"{_esc(_visible(t.token))}{_tip(t, a, b)}</span>"
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
