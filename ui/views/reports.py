"""JSON and tables of the architecture printouts and of an evaluation report, for the API and the UI."""

from __future__ import annotations

from ui.views.style import money as _money
from utils.core.seam import BASE, FINE_TUNED

EVAL_PANES = {"base": BASE, "fine-tuned": FINE_TUNED}  # utils.task.evaluate's pane names -> the engine's keys


def architecture_json(views) -> dict:
    """utils.analysis.architecture.ArchitectureViews as plain JSON: the two printouts and the marked diff."""
    return {
        "base": views.base_text,
        "peft": views.peft_text,
        "diff": views.diff_text,
        "added_lines": views.added_lines,
    }


def _metrics_json(m) -> dict:
    return {"count": m.count, "mae": m.mae, "rmsle": m.rmsle, "hit_rate": m.hit_rate, "unparsed": m.unparsed}


def eval_json(report, notice: str = "", with_strengths: bool = False) -> dict:
    """utils.task.evaluate.EvaluationReport as JSON, panes keyed "base" / "fine_tuned" like the other endpoints;
    with_strengths adds "by_strength": [{"strength", "pane", "metrics": {method: ...}}] by increasing s."""
    out = {
        "n_items": len(report.items),
        "seconds": report.seconds,
        "k": report.k,
        "notice": notice,
        "metrics": {
            EVAL_PANES.get(pane, pane): {method: _metrics_json(m) for method, m in by_method.items()}
            for pane, by_method in report.metrics.items()
        },
        "items": [
            {
                "description": item.description,
                "price": item.truth,
                **{
                    EVAL_PANES.get(pane, pane): {"text": r.text, "predictions": dict(r.predictions)}
                    for pane, r in item.panes.items()
                },
            }
            for item in report.items
        ],
    }
    if with_strengths:
        out["by_strength"] = [
            {
                "strength": s,
                "pane": EVAL_PANES.get(pane, pane),
                "metrics": {method: _metrics_json(m) for method, m in report.metrics[pane].items()},
            }
            for pane, s in sorted(report.strengths.items(), key=lambda x: x[1])
        ]
    return out


def eval_items_frame(report, method: str = "greedy"):
    """One row per evaluated item: description, true price, and each pane's prediction by `method` (as text)."""
    import pandas as pd

    rows = []
    for item in report.items:
        row = {"description": item.description, "price": _money(item.truth)}
        for pane, result in item.panes.items():
            row[pane] = _money(result.predictions.get(method))
        rows.append(row)
    return pd.DataFrame(rows)
