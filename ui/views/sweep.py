"""The strength sweep's views: the update formula with the loaded adapter's numbers, the sweep's JSON, and the
price against strength. The adapter as a delta: each LoRA layer outputs `W x + s · (alpha / r) · B A x`, so
s = 0 is the base, s = 1 the fine-tune as trained, and other values scale (or, below 0, reverse) the change."""

from __future__ import annotations

import math

from utils.core.profiles import LoraSettings

DEFAULT_STRENGTHS = "0, 0.5, 1, 1.5, 2"


def formula_markdown(lora: LoraSettings | None) -> str:
    """The update formula with the loaded adapter's alpha and r filled in.

    Example: r=32, alpha=64 -> "... alpha / r = 64 / 32 = 2 ..."
    """
    if lora is None:
        return "No adapter is loaded (base-only): only strength s = 0 (the base) exists."
    ratio = lora.alpha / lora.r
    return (
        "Each adapted layer computes **W x + s · (alpha / r) · B A x**. The loaded adapter has "
        f"r = {lora.r} and alpha = {lora.alpha:g}, so alpha / r = {lora.alpha:g} / {lora.r} = **{ratio:g}**: "
        f"at strength s the update is scaled by {ratio:g}·s. s = 0 is the base, s = 1 the fine-tune as "
        "trained; values in [-2, 3] are allowed (negative values subtract the fine-tune's change)."
    )


def sweep_json(strengths: list[float], texts: list[str]) -> list[dict]:
    """The /sweep result: one {"strength", "text"} per strength, in the order given."""
    return [{"strength": float(s), "text": t} for s, t in zip(strengths, texts, strict=True)]


def price_figure(strengths: list[float], estimates: list[dict], truth: float | None = None):
    """Price against strength: the number in each pane's greedy text and its top-K price, plus the catalog's
    true price as a horizontal line when the prompt is a catalog item. A matplotlib Figure (no pyplot)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4), layout="constrained")
    axis = figure.subplots()
    order = sorted(range(len(strengths)), key=lambda i: strengths[i])
    xs = [strengths[i] for i in order]

    def series(field):
        values = [estimates[i][field] for i in order]
        return [v if v is not None and math.isfinite(v) else float("nan") for v in values]

    axis.plot(xs, series("extracted_price"), marker="o", color="#4f46e5", label="price in the greedy text")
    axis.plot(xs, series("topk_price"), marker="s", linestyle="--", color="#d97706", label="top-K price")
    if truth is not None:
        axis.axhline(truth, color="#059669", linewidth=1.5, label=f"true price (\\${truth:,.2f})")
    axis.axvline(1.0, color="0.6", linestyle=":", linewidth=1)
    axis.set_xlabel("adapter strength s  (0 = base, 1 = fine-tune as trained)")
    axis.set_ylabel("price (\\$)")
    axis.grid(True, alpha=0.25)
    axis.legend(fontsize=8)
    axis.set_title("The price the model writes, by adapter strength")
    return figure


def panes_json(panes, texts: list[str]) -> list[dict]:
    """The /sweep result over adapters: one {"adapter", "strength", "label", "text"} per pane, in order."""
    return [
        {"adapter": p.adapter, "strength": p.strength if p.adapter else 0.0, "label": p.label, "text": t}
        for p, t in zip(panes, texts, strict=True)
    ]


def pane_price_figure(labels: list[str], estimates: list[dict], truth: float | None = None):
    """The price each pane writes (greedy text) and its top-K price, a pair of bars per pane, with the true
    price of a catalog item as a line: panes over adapters have no strength axis."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(6.0, 1.4 * len(labels)), 4), layout="constrained")
    axis = figure.subplots()
    xs = range(len(labels))

    def values(field):
        return [
            e[field] if e[field] is not None and math.isfinite(e[field]) else float("nan") for e in estimates
        ]

    axis.bar(
        [x - 0.2 for x in xs],
        values("extracted_price"),
        0.4,
        color="#4f46e5",
        label="price in the greedy text",
    )
    axis.bar([x + 0.2 for x in xs], values("topk_price"), 0.4, color="#d97706", label="top-K price")
    if truth is not None:
        axis.axhline(truth, color="#059669", linewidth=1.5, label=f"true price (\\${truth:,.2f})")
    axis.set_xticks(list(xs), [label.replace("$", "\\$") for label in labels], fontsize=8)
    axis.set_ylabel("price (\\$)")
    axis.grid(True, axis="y", alpha=0.25)
    axis.legend(fontsize=8)
    axis.set_title("The price each pane writes")
    return figure


def divergence_markdown(rows, panes: dict, decode) -> str:
    """Where each pane first departs from the first pane's text, token by token."""
    from utils.core.seam import first_divergence

    first = panes[rows[0].key]
    parts = []
    for row in rows[1:]:
        state = panes[row.key]
        at = first_divergence(first.token_ids, state.token_ids)
        if at is None:
            parts.append(f"**{row.label}**: the same text")
        else:
            word = decode(state.token_ids[at : at + 1]) if at < len(state.token_ids) else "(end)"
            parts.append(f"**{row.label}**: from token {at + 1} (writes {word!r})")
    return f"Against **{rows[0].label}**: " + "; ".join(parts) + "." if parts else ""
