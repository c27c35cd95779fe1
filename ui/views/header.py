"""The header: which base and adapter, on which device, in what precision, their footprints, and notices."""

from __future__ import annotations

from ui.views.style import escape as _e
from utils.core.profiles import ModelProfile

# Scoped CSS for the gr.HTML blocks (gradio's css_template); theme variables keep dark mode readable.
HEADER_CSS = """
.lens-header h1 { margin: 0 0 4px 0; font-size: 1.6em; }
.lens-header .tagline { margin: 0 0 10px 0; color: var(--body-text-color-subdued); }
.lens-cards { display: flex; flex-wrap: wrap; gap: 8px; }
.lens-card { flex: 1 1 200px; border: 1px solid var(--border-color-primary); border-radius: 8px;
  padding: 6px 10px; background: var(--block-background-fill); min-width: 0; }
.lens-card .k { font-size: 0.78em; text-transform: uppercase; letter-spacing: .04em;
  color: var(--body-text-color-subdued); }
.lens-card .v { font-weight: 600; overflow-wrap: anywhere; }
.lens-card .s { font-size: 0.85em; color: var(--body-text-color-subdued); overflow-wrap: anywhere; }
.lens-notice { margin-top: 8px; padding: 6px 10px; border-radius: 8px; border-left: 4px solid #d97706;
  background: rgba(217, 119, 6, 0.10); overflow-wrap: anywhere; }
"""


def format_count(n: int) -> str:
    """A parameter count with its magnitude. Example: format_count(8_030_261_248) == "8,030,261,248 (8.03 B)" """
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n:,} ({n / size:.2f} {unit})"
    return f"{n:,}"


def format_size(n_bytes: int) -> str:
    """Decimal units as in utils.analysis.sizing. Example: format_size(25_204_032) == "25.20 MB"; format_size(28_672) == "28.67 kB" """
    from utils.analysis.sizing import format_bytes

    return format_bytes(n_bytes)


def header_html(report, profile: ModelProfile | None = None) -> str:
    """The header: which base and adapter, on which device, in what precision, their footprints, notices.

    `report` is utils.runtime.loading.LoadReport. Everything is escaped; notices (fallbacks, base-only) are shown
    in a highlighted box so nobody mistakes a base-only run for a fine-tune.
    """
    precision = {
        "nf4": "NF4 4-bit (bitsandbytes, double quant)",
        "served": "as the server holds it",
    }.get(report.precision, "full precision")
    cards = [
        (
            "Base",
            report.base,
            f"{format_count(report.base_params)} params · {format_size(report.base_footprint_bytes)}",
        ),
    ]
    n_adapters = len(getattr(report, "adapters", []) or []) or 1
    plural = "s" if n_adapters > 1 else ""
    adds = f"the {n_adapters} adapters add" if n_adapters > 1 else "adapter adds"
    if report.adapter:
        cards.append(
            (
                "LoRA adapter",
                report.adapter,
                f"{format_count(report.adapter_params)} params · file {format_size(report.adapter_file_bytes)}",
            )
        )
        cards.append(
            ("Footprint", "on the server", "the server holds the weights; Size math shows what they take")
            if report.precision == "served"
            else (
                "Footprint",
                f"{format_size(report.footprint_with_adapter_bytes)} with the adapter{plural}",
                f"base alone {format_size(report.base_footprint_bytes)} · "
                f"{adds} {format_size(report.footprint_with_adapter_bytes - report.base_footprint_bytes)}",
            )
        )
    else:
        cards.append(("LoRA adapter", "none: base-only", "only the base pane is available"))
    more = list(getattr(report, "adapters", []) or [])[1:]
    if more:
        cards.append(
            (
                f"{len(more)} more adapter{'s' if len(more) > 1 else ''}",
                ", ".join(a["name"] for a in more),
                " · ".join(
                    f"{a['name']}: {a['parameters']:,} params, file {format_size(a['file_bytes'])}, "
                    f"{format_size(a['footprint_bytes'])} in memory"
                    for a in more
                ),
            )
        )
    kernel = f" · {report.kernel}" if getattr(report, "kernel", "") else ""
    cards.append(("Device", report.device, f"{precision} · compute {report.compute_dtype}{kernel}"))
    backend = getattr(report, "backend", "")
    if backend:
        cards.append(("Model runs", backend, "the views' model calls go here"))
    title = profile.title if profile is not None else report.title
    parts = [
        '<div class="lens-header">',
        "<h1>LoRA Lens</h1>",
        f'<p class="tagline">What a LoRA fine-tune changes: base and fine-tuned side by side from one '
        f"4-bit model. Loaded: <b>{_e(title)}</b> (profile <code>{_e(report.profile)}</code>, "
        f"loaded in {report.load_seconds:.1f} s).</p>",
    ]
    asked = getattr(report, "asked", "")
    if asked:
        parts.append(f'<p class="tagline" id="lens-asked">Asked for: {_e(asked)}.</p>')
    parts += [
        '<div class="lens-cards">',
    ]
    for key, value, sub in cards:
        parts.append(
            f'<div class="lens-card"><div class="k">{_e(key)}</div><div class="v">{_e(value)}</div>'
            f'<div class="s">{_e(sub)}</div></div>'
        )
    parts.append("</div>")
    parts += [f'<div class="lens-notice">{_e(n)}</div>' for n in report.notices]
    parts.append("</div>")
    return "\n".join(parts)
