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

from utils.analysis.sizing import checks, formula, models, report
from utils.analysis.sizing.checks import *  # noqa: F403  (each module's __all__)
from utils.analysis.sizing.formula import *  # noqa: F403  (each module's __all__)
from utils.analysis.sizing.models import *  # noqa: F403  (each module's __all__)
from utils.analysis.sizing.report import *  # noqa: F403  (each module's __all__)

__all__ = [*checks.__all__, *formula.__all__, *models.__all__, *report.__all__]
