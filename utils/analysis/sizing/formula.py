"""Size math by hand: LoRA parameters of a linear layer, NF4 bytes and quantization state, and the
dataclasses that carry a size report. Pure Python; every function has a hand-checkable example."""

from __future__ import annotations

import math
from dataclasses import dataclass

from utils.core.profiles import REPO_ROOT, LoraSettings

DEFAULT_LORA = LoraSettings()  # the lesson's pricer: r=32, alpha=64, q/k/v/o
ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer except the output head
SHIPPED_SMOLLM2_CONFIG = REPO_ROOT / "configs" / "smollm2-135m" / "config.json"
NF4_BLOCKSIZE = 64  # bitsandbytes Params4bit: one absmax per 64 weights
NESTED_BLOCKSIZE = 256  # double quant: one fp32 absmax per 256 (8-bit) absmax values
ADAPTER_FILE = "adapter_model.safetensors"
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
SAFETENSORS_BYTES.update({"F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1})


def lora_params(in_features: int, out_features: int, r: int) -> int:
    """Parameters LoRA adds to one linear layer: A is in x r, B is r x out (no bias by default).

    Example: lora_params(4096, 1024, 32) == 4096 * 32 + 32 * 1024 == 163_840
    """
    return r * (in_features + out_features)


def nf4_bytes(numel: int) -> int:
    """Bytes of one 4-bit weight as bitsandbytes packs it: two weights per uint8, rounded up.

    Example: nf4_bytes(4096 * 4096) == 8_388_608; nf4_bytes(3) == 2
    """
    return (numel + 1) // 2


def nf4_quant_state_bytes(numel: int, blocksize: int = NF4_BLOCKSIZE) -> int:
    """Bytes of the double-quantized NF4 state bitsandbytes keeps beside one 4-bit weight.

    One uint8 absmax per block of 64 weights, one fp32 absmax per 256 of those, an fp32 offset, and the
    two fp32 code books (16 NF4 levels, 256 8-bit levels) that each layer holds its own copy of.
    get_memory_footprint() does not count these: they are attributes of the weight, not tensors of the model.
    Example: nf4_quant_state_bytes(4096) == 64 + 4 + 4 + 64 + 1024 == 1_160
    """
    blocks = math.ceil(numel / blocksize)
    return blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 + 16 * 4 + 256 * 4


def format_bytes(n: int) -> str:
    """Decimal units, as disk and GPU vendors count: MB = 10^6 bytes, GB = 10^9 bytes.

    Example: format_bytes(109_051_904) == "109.05 MB"; format_bytes(5_591_539_712) == "5.59 GB"
    """
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


@dataclass(frozen=True)
class LinearLayer:
    """One linear layer of a model, with the shape its weight has."""

    name: str  # full module name, e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    bias: bool = False  # the base layer has a bias (LoRA still adds none)
    is_output: bool = False  # the output head (lm_head), which "all-linear" leaves out

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ModuleSize:
    """LoRA cost of one kind of target module: every copy with the same name and shape."""

    name: str  # leaf name, e.g. "q_proj"
    in_features: int
    out_features: int
    r: int
    count: int  # copies in the model, usually one per decoder layer

    @property
    def a_params(self) -> int:
        return self.in_features * self.r

    @property
    def b_params(self) -> int:
        return self.r * self.out_features

    @property
    def params(self) -> int:
        """One copy: r x (in + out)."""
        return lora_params(self.in_features, self.out_features, self.r)

    @property
    def total_params(self) -> int:
        return self.params * self.count

    @property
    def formula(self) -> str:
        return f"{self.in_features}x{self.r} + {self.r}x{self.out_features}"


@dataclass(frozen=True)
class AdapterSize:
    """What a LoRA with these settings adds to one model."""

    r: int
    alpha: int
    target_modules: tuple[str, ...]  # as requested (names or "all-linear")
    modules: tuple[ModuleSize, ...]  # one row per kind of targeted module, in model order
    num_layers: int | None  # decoder layers in the config (None where it has no such field)

    @property
    def params(self) -> int:
        return sum(m.total_params for m in self.modules)

    @property
    def tensors(self) -> int:
        """lora_A and lora_B weight for every targeted layer."""
        return 2 * sum(m.count for m in self.modules)

    @property
    def per_layer(self) -> bool:
        """Every targeted module appears once per decoder layer, so the sum reads 'per layer x layers'."""
        return bool(self.modules) and all(m.count == self.num_layers for m in self.modules)

    @property
    def per_layer_params(self) -> int | None:
        return sum(m.params for m in self.modules) if self.per_layer else None

    @property
    def bytes_fp32(self) -> int:
        return 4 * self.params

    @property
    def bytes_bf16(self) -> int:
        return 2 * self.params

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class BaseSize:
    """The base model's parameters and what they weigh in fp32, bf16 and NF4 (as bitsandbytes loads it)."""

    params: int  # every parameter once (tied weights counted once)
    quantized_params: int  # weights of the linear layers NF4 packs, 4 bits each
    kept: tuple[tuple[str, int], ...]  # (what, params) left in kept_dtype: embeddings, lm_head, norms, biases
    kept_dtype: str  # dtype of the layers NF4 leaves alone (the config's dtype unless overridden)
    kept_bytes: int  # their bytes at their dtype
    nf4_linear_bytes: int  # the packed 4-bit weights: numel / 2
    buffer_bytes: int  # non-parameter tensors (rotary inv_freq ...), counted by get_memory_footprint()
    quant_state_bytes: int  # absmax and code books of the 4-bit layers: real memory, not in the footprint

    @property
    def kept_params(self) -> int:
        return self.params - self.quantized_params

    @property
    def bytes_fp32(self) -> int:
        return 4 * self.params

    @property
    def bytes_bf16(self) -> int:
        return 2 * self.params

    @property
    def nf4_weight_bytes(self) -> int:
        """All parameter bytes of the NF4 model: packed linear weights plus the 16-bit (or 32-bit) rest."""
        return self.nf4_linear_bytes + self.kept_bytes

    @property
    def nf4_footprint(self) -> int:
        """What model.get_memory_footprint() reports: parameters plus buffers."""
        return self.nf4_weight_bytes + self.buffer_bytes


@dataclass(frozen=True)
class SizeReport:
    """Base and adapter sizes for one config and one set of LoRA settings."""

    model_class: str  # e.g. "LlamaForCausalLM"
    source: str  # where the config came from, for the header line
    base: BaseSize
    adapter: AdapterSize

    @property
    def share_of_base(self) -> float:
        """Adapter params as a fraction of the base's."""
        return self.adapter.params / self.base.params

    @property
    def nf4_with_adapter_bytes(self) -> int:
        """Parameter bytes of the loaded pair: NF4 base plus the adapter in fp32 (peft's default)."""
        return self.base.nf4_weight_bytes + self.adapter.bytes_fp32

    @property
    def nf4_with_adapter_footprint(self) -> int:
        """get_memory_footprint() of the PeftModel: the above plus the buffers."""
        return self.base.nf4_footprint + self.adapter.bytes_fp32


__all__ = [
    "ADAPTER_FILE",
    "ALL_LINEAR",
    "AdapterSize",
    "BaseSize",
    "DEFAULT_LORA",
    "LinearLayer",
    "ModuleSize",
    "NESTED_BLOCKSIZE",
    "NF4_BLOCKSIZE",
    "SAFETENSORS_BYTES",
    "SHIPPED_SMOLLM2_CONFIG",
    "SizeReport",
    "format_bytes",
    "lora_params",
    "nf4_bytes",
    "nf4_quant_state_bytes",
]
