"""The token lens across panes: a table of every pane's text under every pane's model, and a summary of how far
each model moved from the base and from the other of the chosen pair."""

from __future__ import annotations

import math

from utils.analysis.pane_lens import PaneLens


def pane_lens_frame(lens: PaneLens):
    """Rows: the texts; columns: the models; cells: log p(text | prompt) under that model (natural log). The
    last row: KL(model || base) per token, over every text."""
    import pandas as pd

    keys = lens.keys
    rows = []
    for text in keys:
        row = {"text of": lens.labels[text], "tokens": len(lens.logprobs.get((text, keys[0])) or [])}
        for model in keys:
            total = lens.total(text, model)
            row[f"log p under {lens.labels[model]}"] = None if total is None else round(total, 2)
        rows.append(row)
    kl = {"text of": "KL(model || base) per token", "tokens": None}
    for model in keys:
        value = lens.mean_kl(model)
        kl[f"log p under {lens.labels[model]}"] = None if value is None else round(value, 4)
    return pd.DataFrame([*rows, kl])


def pane_lens_summary(lens: PaneLens) -> str:
    """Which model each text is most likely under, and how far the pair's models are from each other."""
    lines = []
    for text in lens.keys:
        totals = {m: lens.total(text, m) for m in lens.keys}
        totals = {m: v for m, v in totals.items() if v is not None}
        if not totals:
            continue
        best = max(totals, key=totals.get)
        lines.append(f"- {lens.labels[text]}'s text is most likely under **{lens.labels[best]}**.")
    if lens.pair:
        a, b = lens.pair
        values = [t.kl for view in lens.pair_view.values() for t in view.tokens]
        if values:
            mean = sum(values) / len(values)
            lines.append(
                f"- KL({lens.labels[a]} || {lens.labels[b]}) averages **{mean:.4f} nats** a token over every text; "
                f"the tokens above are coloured by log p under {lens.labels[a]} minus log p under {lens.labels[b]}."
            )
    far = [(lens.mean_kl(m), m) for m in lens.keys]
    far = [(v, m) for v, m in far if v is not None and not math.isnan(v) and v > 0]
    if far:
        value, model = max(far)
        lines.append(f"- Furthest from the base: **{lens.labels[model]}** (KL {value:.4f} nats a token).")
    return "\n".join(lines)
