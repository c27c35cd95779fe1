"""JSON and tables of the architecture printouts and of an evaluation report, for the API and the UI."""

from __future__ import annotations

from ui.views.style import SHORT_LABELS
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
            for pane, s in sorted(
                ((p, v) for p, v in report.strengths.items() if isinstance(v, (int, float))),
                key=lambda x: x[1],
            )
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


def own_data_json(report) -> dict:
    """utils.task.own_data.OwnDataReport as the /evaluate_data result (see EvaluateTab.evaluate_data)."""
    return {
        "n_items": len(report.items),
        "seconds": report.seconds,
        "max_new_tokens": report.max_new_tokens,
        "totals": report.totals,
        "flips": report.flips(),
        "items": [
            {
                "prompt": s.example.prompt,
                "answer": s.example.answer,
                "answer_tokens": s.answer_tokens,
                "logprob_gain": s.logprob_gain,
                **{
                    key: {
                        "text": m.text,
                        "exact": m.exact,
                        "contains": m.contains,
                        "logprob_answer": m.logprob_answer,
                    }
                    for key, m in s.models.items()
                },
            }
            for s in report.items
        ],
    }


def own_data_markdown(report) -> str:
    """The totals per model and the flips, as a table and a sentence."""
    lines = [
        f"Scored {len(report.items)} items in {report.seconds:.1f} s (greedy answers up to "
        f"{report.max_new_tokens} tokens).",
        "",
        "| Model | Exact match | Contains the answer | Mean log p(answer) | Log p per answer token |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, totals in report.totals.items():
        lines.append(
            f"| {SHORT_LABELS.get(key, key)} | {totals['exact_match']:.1%} | {totals['contains']:.1%} | "
            f"{totals['mean_logprob_answer']:.3f} | {totals['logprob_per_answer_token']:.3f} |"
        )
    flips = report.flips()
    lines += [
        "",
        f"The fine-tune fixed {len(flips['fixed'])} item(s) and broke {len(flips['broken'])} (its answer now "
        "does, or no longer does, contain the reference). Log p(answer) is the reference answer's log-probability "
        "given the prompt, teacher-forced: higher means the model finds your answer more likely.",
    ]
    return "\n".join(lines)


def own_data_frame(report):
    """One row per item: prompt, reference, each model's answer and verdict, and the log-probability gain."""
    import pandas as pd

    rows = []
    for s in report.items:
        base, tuned = s.models[BASE], s.models[FINE_TUNED]
        rows.append(
            {
                "prompt": s.example.prompt,
                "reference": s.example.answer,
                "base": base.text,
                "base contains": "yes" if base.contains else "no",
                "fine-tuned": tuned.text,
                "fine-tuned contains": "yes" if tuned.contains else "no",
                "log p gain (nats)": round(s.logprob_gain, 3),
            }
        )
    return pd.DataFrame(rows)
