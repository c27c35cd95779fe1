"""A size report as the step-by-step text (the CLI and the Size math tab) and as JSON (the API)."""

from __future__ import annotations

from utils.analysis.sizing.formula import AdapterSize, SizeReport, format_bytes


def formula_lines(adapter: AdapterSize) -> list[str]:
    """The adapter's size step by step, the way the lesson writes it.

    Example (Llama-3.1-8B, r=32, q/k/v/o): "q_proj: 4096x32 + 32x4096 = 262,144", ..., "per layer: 851,968",
    "x 32 layers = 27,262,976 params", "x 4 bytes (fp32) = 109,051,904 bytes = 109.05 MB"
    """
    lines = []
    width = max((len(m.name) for m in adapter.modules), default=0)
    for m in adapter.modules:
        copies = "" if adapter.per_layer else f"  x {m.count} = {m.total_params:,}"
        lines.append(f"{m.name + ':':<{width + 1}} {m.formula} = {m.params:,}{copies}")
    if adapter.per_layer:
        lines.append(f"per layer: {adapter.per_layer_params:,}")
        lines.append(f"x {adapter.num_layers} layers = {adapter.params:,} params")
    else:
        lines.append(f"total: {adapter.params:,} params")
    lines.append(f"x 4 bytes (fp32) = {adapter.bytes_fp32:,} bytes = {format_bytes(adapter.bytes_fp32)}")
    lines.append(f"x 2 bytes (bf16) = {adapter.bytes_bf16:,} bytes = {format_bytes(adapter.bytes_bf16)}")
    return lines


def format_report(report: SizeReport) -> str:
    """The plain-text table the command line prints: modules, the formula step by step, the base in NF4."""
    a, b = report.adapter, report.base
    out = [
        f"{report.model_class}  ({report.source})",
        f"LoRA r = {a.r}, alpha = {a.alpha} (scale alpha / r = {a.scaling:g}), "
        f"target modules: {', '.join(a.target_modules)}",
        "",
        f"{'module':<14}{'in':>8}{'out':>8}   {'A = in x r':<16}{'B = r x out':<16}"
        f"{'r x (in + out)':>16}{'copies':>8}",
    ]
    for m in a.modules:
        out.append(
            f"{m.name:<14}{m.in_features:>8}{m.out_features:>8}   "
            f"{f'{m.in_features} x {m.r}':<16}{f'{m.r} x {m.out_features}':<16}{m.params:>16,}{m.count:>8}"
        )
    out += ["", "Adapter, step by step:"]
    out += [f"  {line}" for line in formula_lines(a)]
    out.append(f"  share of the base: {a.params:,} / {b.params:,} = {100 * report.share_of_base:.2f} %")
    out += [
        "",
        "Base model:",
        f"  params: {b.params:,}",
        f"  fp32: {b.bytes_fp32:,} bytes = {format_bytes(b.bytes_fp32)}",
        f"  bf16: {b.bytes_bf16:,} bytes = {format_bytes(b.bytes_bf16)}",
        f"  NF4: {b.quantized_params:,} linear weights / 2 = {b.nf4_linear_bytes:,} bytes",
        f"     + {b.kept_params:,} params kept in {b.kept_dtype} = {b.kept_bytes:,} bytes",
        "       (" + ", ".join(f"{what} {n:,}" for what, n in b.kept) + ")",
        f"     = {b.nf4_weight_bytes:,} bytes = {format_bytes(b.nf4_weight_bytes)} of weights",
        f"  get_memory_footprint(): + {b.buffer_bytes:,} bytes of buffers = {b.nf4_footprint:,} bytes",
        f"  with the fp32 adapter: {b.nf4_weight_bytes:,} + {a.bytes_fp32:,} = "
        f"{report.nf4_with_adapter_bytes:,} bytes = {format_bytes(report.nf4_with_adapter_bytes)}",
        f"  not in the footprint: NF4 quantization state (absmax, code books) {b.quant_state_bytes:,} bytes "
        f"= {format_bytes(b.quant_state_bytes)}",
    ]
    return "\n".join(out)


def report_json(report: SizeReport) -> dict:
    """The report as one JSON-ready object (what --json prints)."""
    a, b = report.adapter, report.base
    return {
        "model_class": report.model_class,
        "source": report.source,
        "r": a.r,
        "alpha": a.alpha,
        "target_modules": list(a.target_modules),
        "per_module": [
            {
                "name": m.name,
                "in_features": m.in_features,
                "out_features": m.out_features,
                "a_params": m.a_params,
                "b_params": m.b_params,
                "params": m.params,
                "count": m.count,
                "total_params": m.total_params,
            }
            for m in a.modules
        ],
        "num_layers": a.num_layers,
        "per_layer_params": a.per_layer_params,
        "adapter_params": a.params,
        "adapter_tensors": a.tensors,
        "adapter_bytes_fp32": a.bytes_fp32,
        "adapter_bytes_bf16": a.bytes_bf16,
        "share_of_base": report.share_of_base,
        "base_params": b.params,
        "base_bytes_fp32": b.bytes_fp32,
        "base_bytes_bf16": b.bytes_bf16,
        "base_nf4_linear_bytes": b.nf4_linear_bytes,
        "base_kept_dtype": b.kept_dtype,
        "base_kept_bytes": b.kept_bytes,
        "base_nf4_weight_bytes": b.nf4_weight_bytes,
        "base_nf4_footprint": b.nf4_footprint,
        "base_nf4_quant_state_bytes": b.quant_state_bytes,
        "nf4_with_adapter_bytes": report.nf4_with_adapter_bytes,
        "nf4_with_adapter_footprint": report.nf4_with_adapter_footprint,
    }


__all__ = ["format_report", "formula_lines", "report_json"]
