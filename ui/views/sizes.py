"""The Size math tab's tables and chart, and the cross-checks as markdown and JSON."""

from __future__ import annotations

from ui.views.header import format_count
from ui.views.style import PANE_COLOURS
from utils.core.profiles import LoraSettings
from utils.core.seam import BASE, FINE_TUNED


def size_summary_frame(reports: dict):
    """The headline numbers of several SizeReports side by side: one row per quantity, one column per model."""
    import pandas as pd

    from utils.analysis.sizing import format_bytes

    def b(n):
        return f"{n:,} bytes = {format_bytes(n)}"

    rows = [
        (
            "LoRA r, alpha, targets",
            lambda s: f"{s.adapter.r}, {s.adapter.alpha:g}, {', '.join(s.adapter.target_modules)}",
        ),
        ("Adapter parameters", lambda s: f"{s.adapter.params:,}"),
        ("Adapter in fp32", lambda s: b(s.adapter.bytes_fp32)),
        ("Adapter in bf16", lambda s: b(s.adapter.bytes_bf16)),
        ("Adapter share of the base", lambda s: f"{100 * s.share_of_base:.3f} %"),
        ("Base parameters", lambda s: format_count(s.base.params)),
        ("Base in fp32", lambda s: b(s.base.bytes_fp32)),
        ("Base in bf16", lambda s: b(s.base.bytes_bf16)),
        ("Base in NF4 (weights)", lambda s: b(s.base.nf4_weight_bytes)),
        ("NF4 base + fp32 adapter", lambda s: b(s.nf4_with_adapter_bytes)),
    ]
    data = {"quantity": [name for name, _ in rows]}
    for name, report in reports.items():
        data[name] = [fn(report) for _, fn in rows]
    return pd.DataFrame(data)


def size_chart(reports: dict):
    """Base vs adapter bytes per dtype (fp32, bf16, NF4), one panel per model, log scale, labelled bars.

    In the NF4 group the adapter bar is its fp32 size: QLoRA keeps the adapter in full precision.
    """
    from matplotlib.figure import Figure

    from utils.analysis.sizing import format_bytes

    figure = Figure(figsize=(5.2 * max(len(reports), 1), 4.2), layout="constrained")
    axes = figure.subplots(1, max(len(reports), 1), squeeze=False)[0]
    groups = ("fp32", "bf16", "NF4 base\n(adapter fp32)")
    for axis, (name, s) in zip(axes, reports.items(), strict=False):
        base = (s.base.bytes_fp32, s.base.bytes_bf16, s.base.nf4_weight_bytes)
        adapter = (s.adapter.bytes_fp32, s.adapter.bytes_bf16, s.adapter.bytes_fp32)
        xs = range(len(groups))
        for offset, label, values, colour in (
            (-0.2, "base", base, PANE_COLOURS[BASE]),
            (0.2, "adapter", adapter, PANE_COLOURS[FINE_TUNED]),
        ):
            bars = axis.bar([x + offset for x in xs], values, width=0.38, label=label, color=colour)
            axis.bar_label(bars, labels=[format_bytes(v) for v in values], fontsize=7, padding=2)
        axis.set_yscale("log")
        axis.set_xticks(list(xs), groups)
        axis.set_ylabel("bytes (log scale)")
        axis.set_title(name, fontsize=10)
        axis.margins(y=0.25)
        axis.legend(fontsize=8, loc="upper right")
        axis.grid(True, axis="y", alpha=0.25)
    return figure


def cross_checks_frame(checks):
    """utils.analysis.sizing.CrossChecks as a DataFrame in its own column order."""
    import pandas as pd

    return pd.DataFrame(checks.table(), columns=list(checks.headers))


def cross_checks_markdown(checks, lora: LoraSettings) -> str:
    """One line on whether the three counts agree, with the settings used, then the notes."""
    verdict = "agree" if checks.agree else "DISAGREE"
    out = [
        f"**The three counts {verdict}** (r = {lora.r}, alpha = {lora.alpha:g}, targets "
        f"{', '.join(lora.target_modules)}, read from the adapter's adapter_config.json)."
    ]
    out += [f"- {note}" for note in checks.notes]
    return "\n".join(out)


def cross_checks_json(checks) -> dict:
    return {
        "agree": checks.agree,
        "rows": [
            dict(
                zip(
                    ("source", "tensors", "params", "bytes", "note"),
                    (r.source, r.tensors, r.params, r.bytes, r.note),
                    strict=True,
                )
            )
            for r in checks.rows
        ],
        "notes": list(checks.notes),
    }
