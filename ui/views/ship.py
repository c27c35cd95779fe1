"""The Ship tab's views: the merge routes' table, the heatmap of what each layer loses, the answers side by side."""

from __future__ import annotations

from ui.views.style import escape
from utils.analysis.merge_check import ROUTE_LABELS


def routes_markdown(result) -> str:
    """Every route: the update lost (median and worst layer), KL against the unmerged adapter, answers kept,
    and the price metrics where the profile is a pricer; then the routes left out and why."""
    check = result.check
    priced = bool(result.metrics)
    head = (
        "| route | update lost (median layer) | worst layer | KL / token | Δ log p / token | same answers |"
    )
    rule = "|---|---:|---:|---:|---:|---:|"
    if priced:
        head += " MAE | hit rate |"
        rule += "---:|---:|"
    lines = [head, rule]
    if priced:
        lines.append(
            "| unmerged adapter on the 4-bit base (the reference) | 0 | 0 | 0 | 0 | 100% |"
            + _metric_cells(result.metrics["unmerged"])
        )
    for route in check.routes:
        kl, change = check.mean_kl(route), check.mean_logprob_change(route)
        same = check.same_answers(route)
        line = (
            f"| **{route}**: {ROUTE_LABELS[route]} | {_pct(check.median_lost(route))} | "
            f"{_pct(check.worst_lost(route))} | {'-' if kl is None else f'{kl:.3g}'} | "
            f"{'-' if change is None else f'{change:+.3g}'} | {'-' if same is None else f'{100 * same:.0f}%'} |"
        )
        if priced:
            line += _metric_cells(result.metrics.get(route))
        lines.append(line)
    for route, why in check.skipped.items():
        lines.append(f"\n*{route}* not run: {escape(why)}")
    return "\n".join(lines)


def _metric_cells(m: dict | None) -> str:
    """MAE and hit rate cells; "-" where no answer held a price."""
    if not m or m.get("mae") is None:
        return " - | - |"
    return f" ${m['mae']:,.2f} | {100 * m['hit_rate']:.0f}% |"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%" if x < 0.1 else f"{100 * x:,.1f}%"


def lost_figure(check, route: str):
    """Layers x modules, coloured by the share of the update the route loses there."""
    from ui.views.anatomy import layer_module_figure

    cells = [(m.layer, m.module, 100 * m.lost[route]) for m in check.modules]
    return layer_module_figure(
        cells, "% of the update lost", f"{route}: ‖W' − W − ΔW‖ / ‖ΔW‖ per layer", "magma"
    )


def answers_frame(result):
    """The prompt's answer and each item's under the unmerged adapter and every merged copy."""
    import pandas as pd

    check = result.check
    rows = []
    for i, reference in enumerate(check.reference_texts):
        row = {"prompt": "the prompt" if i == 0 else f"item {i}", "unmerged": reference.strip()}
        for route, runs in check.behaviour.items():
            row[route] = runs.texts[i].strip()
        rows.append(row)
    return pd.DataFrame(rows)


def merged_export_markdown(report) -> str:
    """Why the merged model is a CLI export, with its size in each dtype."""
    sizes = ", ".join(
        f"{name} {report.base_params * size / 1e9:.2f} GB" for name, size in (("bf16", 2), ("fp32", 4))
    )
    return (
        f"**The merged model** is as large as the base in its dtype ({sizes}): it is written from the command "
        "line where it fits, not downloaded from the page: `python -m utils.task.ship merged --route fp32 "
        "--out DIR` (routes: nf4, bf16, fp16, fp32, original; see the README)."
    )
