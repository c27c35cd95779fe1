"""The forgetting check's views: the table of cross-entropy and perplexity per model, its chart, the passages
the fine-tune lost most on (coloured as the token lens colours), and the /forgetting JSON."""

from __future__ import annotations

from utils.analysis.token_lens import ScoredText, ScoredToken


def forgetting_json(report, sample: dict) -> dict:
    worst = report.most_forgotten(ranked_model(report), 5) if len(report.models) > 1 else []
    return {
        "sample": sample,
        "seconds": report.seconds,
        "models": [{"model": name, **report.totals[name]} for name in report.models],
        "passages": [
            {
                "index": p.passage.index,
                "tokens": len(p.passage.token_ids),
                "cross_entropy": {name: p.cross_entropy(name) for name in report.models},
            }
            for p in report.passages
        ],
        "most_forgotten": [
            {"index": p.passage.index, "text": p.passage.text, "cross_entropy_rise": rise}
            for p, rise in worst
        ],
    }


def ranked_model(report) -> str:
    """The model the worst passages are ranked for: the fine-tune where scored, else the first other model."""
    names = [n for n in report.models if n != "base"]
    return "fine_tuned" if "fine_tuned" in names else names[0]


def totals_markdown(report) -> str:
    tokens = next(iter(report.totals.values()))["tokens"]
    lines = [
        f"{len(report.passages)} passages, {tokens:,} tokens scored in {report.seconds:.1f} s.",
        "",
        "| Model | Cross-entropy (nats / token) | Perplexity | Change against the base | Perplexity ratio | "
        "KL(model ‖ base) per token |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, t in report.totals.items():
        lines.append(
            f"| {name} | {t['cross_entropy']:.4f} | {t['perplexity']:.2f} | {t['change_vs_base']:+.4f} | "
            f"{t['perplexity_ratio_vs_base']:.3f}x | {t['mean_kl_vs_base']:.4f} |"
        )
    return "\n".join(lines)


def forgetting_figure(report):
    """Cross-entropy per model (bars), the base's drawn across: above it, the model lost general text."""
    from matplotlib.figure import Figure

    names = list(report.totals)
    figure = Figure(figsize=(max(5.0, 1.3 * len(names)), 3.6), layout="constrained")
    axis = figure.subplots()
    values = [report.totals[n]["cross_entropy"] for n in names]
    axis.bar(range(len(names)), values, color=["#8c8c8c" if n == "base" else "#4f46e5" for n in names])
    axis.axhline(report.totals["base"]["cross_entropy"], color="#d97706", linestyle=":", linewidth=1)
    axis.set_xticks(range(len(names)), names, fontsize=8)
    axis.set_ylabel("cross-entropy on general text (nats / token)")
    axis.set_ylim(min(values) * 0.9, max(values) * 1.05)
    axis.grid(True, axis="y", alpha=0.2)
    axis.set_title("General text under each model (lower: better kept)")
    return figure


def worst_passages_frame(report, n: int = 5):
    import pandas as pd

    if len(report.models) < 2:
        return pd.DataFrame()
    model = ranked_model(report)
    rows = [
        {
            "passage": p.passage.index,
            "cross-entropy, base": round(p.cross_entropy("base"), 4),
            f"cross-entropy, {model}": round(p.cross_entropy(model), 4),
            "rise": round(rise, 4),
            "starts": p.passage.text[:160].replace("\n", " "),
        }
        for p, rise in report.most_forgotten(model, n)
    ]
    return pd.DataFrame(rows)


def worst_passage_scored(report, decode) -> dict[str, ScoredText]:
    """The passage the fine-tune lost most on, as the token lens renders it (log p under the fine-tune against
    the base, KL per position; no top tokens were kept)."""
    if len(report.models) < 2:
        return {}
    model = ranked_model(report)
    (worst, _), *_ = report.most_forgotten(model, 1)
    ids = worst.passage.token_ids
    tokens = [
        ScoredToken(
            decode([t]), t, worst.logprobs["base"][j], worst.logprobs[model][j], worst.kl[model][j], [], []
        )
        for j, t in enumerate(ids[1:])
    ]
    return {
        f"passage {worst.passage.index}": ScoredText(f"passage {worst.passage.index}", decode(ids), tokens)
    }
