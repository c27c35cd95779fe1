"""LoRA and base-model size math, computed from a config, never typed in: params, bytes, NF4 footprint.

Shapes are read from the model built on the meta device (no memory; GQA, fused qkv_proj, tied embeddings,
biases all come out right), with a pure Llama formula as the check the step-by-step table spells out.
`cross_checks` sets it beside peft's count and the adapter's safetensors header.

- `formula`: the hand math (LoRA parameters, NF4 bytes) and the report dataclasses; pure Python.
- `models`: configs, meta-device models, linear layers, targets, adapter and base sizes.
- `report`: the step-by-step text and the JSON.
- `checks`: the three counts of a loaded adapter.
- `__main__`: `python -m utils.analysis.sizing CONFIG [--r 32] [--alpha 64] [--target-modules ...] [--json]`.
"""

from utils.analysis.sizing.checks import (
    CrossCheckRow,
    CrossChecks,
    SafetensorsSummary,
    cross_checks,
    peft_lora_count,
    read_safetensors_header,
)
from utils.analysis.sizing.formula import (
    ADAPTER_FILE,
    ALL_LINEAR,
    DEFAULT_LORA,
    NESTED_BLOCKSIZE,
    NF4_BLOCKSIZE,
    SHIPPED_SMOLLM2_CONFIG,
    AdapterSize,
    BaseSize,
    LinearLayer,
    ModuleSize,
    SizeReport,
    format_bytes,
    lora_params,
    nf4_bytes,
    nf4_quant_state_bytes,
)
from utils.analysis.sizing.models import (
    adapter_size,
    base_size,
    build_meta_model,
    embedded_config_path,
    is_llama_family,
    linear_layers,
    llama_base_params,
    llama_linear_layers,
    load_config,
    model_linear_layers,
    resolve_config_path,
    select_targets,
    size_report,
)
from utils.analysis.sizing.report import format_report, formula_lines, report_json

__all__ = [
    "ADAPTER_FILE",
    "ALL_LINEAR",
    "DEFAULT_LORA",
    "NESTED_BLOCKSIZE",
    "NF4_BLOCKSIZE",
    "SHIPPED_SMOLLM2_CONFIG",
    "AdapterSize",
    "BaseSize",
    "CrossCheckRow",
    "CrossChecks",
    "LinearLayer",
    "ModuleSize",
    "SafetensorsSummary",
    "SizeReport",
    "adapter_size",
    "base_size",
    "build_meta_model",
    "cross_checks",
    "embedded_config_path",
    "format_bytes",
    "format_report",
    "formula_lines",
    "is_llama_family",
    "linear_layers",
    "llama_base_params",
    "llama_linear_layers",
    "load_config",
    "lora_params",
    "model_linear_layers",
    "nf4_bytes",
    "nf4_quant_state_bytes",
    "peft_lora_count",
    "read_safetensors_header",
    "report_json",
    "resolve_config_path",
    "select_targets",
    "size_report",
]
