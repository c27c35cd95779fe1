"""LoRA and base-model size math, computed from a config, never typed in: params, bytes, NF4 footprint.

Shapes are read from the model built on the meta device (no memory; GQA, fused qkv_proj, tied embeddings,
biases all come out right), with a pure Llama formula as the check the step-by-step table spells out.
`cross_checks` sets it beside peft's count and the adapter's safetensors header; CLI: python -m utils.analysis.sizing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.core.errors import InputError, LoraLensError
from utils.core.profiles import PROFILES, REPO_ROOT, LoraSettings

DEFAULT_LORA = LoraSettings()  # the lesson's pricer: r=32, alpha=64, q/k/v/o
ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer except the output head
SHIPPED_SMOLLM2_CONFIG = REPO_ROOT / "configs" / "smollm2-135m" / "config.json"
NF4_BLOCKSIZE = 64  # bitsandbytes Params4bit: one absmax per 64 weights
NESTED_BLOCKSIZE = 256  # double quant: one fp32 absmax per 256 (8-bit) absmax values
ADAPTER_FILE = "adapter_model.safetensors"
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
SAFETENSORS_BYTES.update({"F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1})


# ---------------------------------------------------------------------------------------------------
# Pure math


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


# ---------------------------------------------------------------------------------------------------
# Data


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


# ---------------------------------------------------------------------------------------------------
# Configs and meta models


def resolve_config_path(source: str | Path) -> Path:
    """A config.json path from a profile name, a folder that holds one, or the file itself."""
    text = str(source).strip()
    if text in PROFILES:
        profile = PROFILES[text]
        if profile.reference_config is not None:
            return Path(profile.reference_config) / "config.json"
        if profile.is_embedded:
            return embedded_config_path()
        raise InputError(f"Profile {text!r} ships no config; pass the path of its config.json instead.")
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        names = ", ".join(PROFILES)
        raise InputError(
            f"No config.json at {path}; pass a config.json, a folder that contains one, "
            f"or a profile ({names})."
        )
    return path


def embedded_config_path() -> Path:
    """The embedded SmolLM2's config: from the converted cache where present, else the copy in the repo.

    The cache is not created here: converting the GGUF takes about 20 s and the shipped copy is the same file.
    """
    try:
        from utils.core.profiles import read_settings
        from utils.runtime.embedded import cached_dir

        cached = cached_dir(read_settings().cache_dir) / "config.json"
        if cached.is_file():
            return cached
    except LoraLensError:
        pass
    return SHIPPED_SMOLLM2_CONFIG


def load_config(source: Any):
    """A transformers config from a config object, a dict, a config.json path, a folder, or a profile name."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, dict):
        data = dict(source)
        model_type = data.pop("model_type", None)
        if not model_type:
            raise InputError('The config has no model_type; add one (e.g. "llama").')
        return _auto_config(lambda: AutoConfig.for_model(model_type, **data), model_type)
    path = resolve_config_path(source)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not readable JSON ({exc}); pass a model's config.json.") from exc
    return _auto_config(lambda: AutoConfig.from_pretrained(str(path)), data.get("model_type"))


def _auto_config(make, model_type):
    try:
        return make()
    except (ValueError, KeyError, TypeError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(
            f"transformers cannot read this config (model_type={model_type!r}: {first}); "
            "pass the config.json of a causal language model transformers supports."
        ) from exc


def build_meta_model(config, dtype=None):
    """A causal LM built from its config on the meta device: real shapes, no memory.

    Parameters are meta tensors (accelerate's init_empty_weights); the few small buffers (rotary
    inv_freq) stay real, as they are on a loaded model. `dtype` overrides the config's.
    Example: build_meta_model(load_config("llama31-pricer")).num_parameters() == 8_030_261_248
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {"dtype": getattr(torch, dtype) if isinstance(dtype, str) else dtype}
    try:
        with init_empty_weights(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        # init_empty_weights re-creates every registered parameter on meta, which undoes the tying
        # done at init; tie again outside it so tied embeddings are one parameter, as on a loaded model
        model.tie_weights()
        return model
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(
            f"Cannot build {type(config).__name__} as a causal LM on the meta device ({first}); "
            "pass the config of a causal language model transformers supports."
        ) from exc


_META_CACHE: OrderedDict[str, Any] = OrderedDict()
_META_CACHE_SIZE = 8


def _cached_meta_model(config, dtype=None):
    """build_meta_model, remembered per config: the sizing functions only read the model."""
    key = f"{type(config).__name__}|{dtype}|{config.to_json_string(use_diff=False)}"
    if key in _META_CACHE:
        _META_CACHE.move_to_end(key)
        return _META_CACHE[key]
    model = build_meta_model(config, dtype)
    _META_CACHE[key] = model
    while len(_META_CACHE) > _META_CACHE_SIZE:
        _META_CACHE.popitem(last=False)
    return model


def _is_linear(module) -> bool:
    """nn.Linear or GPT-2's Conv1D: what peft's "all-linear" and bitsandbytes both treat as linear."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _linear_shape(module) -> tuple[int, int]:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):  # weight stored as (in, out)
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def model_linear_layers(model) -> list[LinearLayer]:
    """Every linear layer of a (meta or real) model, in module order, with its real shape."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = []
    for name, module in model.named_modules():
        if _is_linear(module):
            in_f, out_f = _linear_shape(module)
            layers.append(
                LinearLayer(name, in_f, out_f, getattr(module, "bias", None) is not None, module is output)
            )
    return layers


def linear_layers(config) -> list[LinearLayer]:
    """Every linear layer the model of this config has, read from the model built on the meta device."""
    return model_linear_layers(_cached_meta_model(load_config(config)))


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def llama_linear_layers(config) -> list[LinearLayer]:
    """The Llama family's linear layers by formula, no model built: q/k/v/o, gate/up/down, lm_head.

    q: hidden -> heads x head_dim; k, v: hidden -> kv_heads x head_dim (grouped-query attention);
    o: heads x head_dim -> hidden; gate, up: hidden -> intermediate; down: intermediate -> hidden.
    Example (Llama-3.1-8B): k_proj is 4096 -> 8 x 128 = 1024.
    """
    c = _text_config(config)
    h, heads = c.hidden_size, c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    hd = getattr(c, "head_dim", None) or h // heads
    inter = c.intermediate_size
    attn_bias, mlp_bias = bool(getattr(c, "attention_bias", False)), bool(getattr(c, "mlp_bias", False))
    layers = []
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        layers += [
            LinearLayer(p + "self_attn.q_proj", h, heads * hd, attn_bias),
            LinearLayer(p + "self_attn.k_proj", h, kv * hd, attn_bias),
            LinearLayer(p + "self_attn.v_proj", h, kv * hd, attn_bias),
            LinearLayer(p + "self_attn.o_proj", heads * hd, h, attn_bias),
            LinearLayer(p + "mlp.gate_proj", h, inter, mlp_bias),
            LinearLayer(p + "mlp.up_proj", h, inter, mlp_bias),
            LinearLayer(p + "mlp.down_proj", inter, h, mlp_bias),
        ]
    layers.append(LinearLayer("lm_head", h, c.vocab_size, False, True))
    return layers


def llama_base_params(config) -> int:
    """Parameters of a Llama-family model by formula: embeddings, layers, final norm, lm_head unless tied.

    Example (SmolLM2-135M, tied): 49152*576 + 30*(884,736 + 2,654,208 + 2*576) + 576 == 134_515_008
    """
    c = _text_config(config)
    linear = sum(
        lay.in_features * lay.out_features + (lay.out_features if lay.bias else 0)
        for lay in llama_linear_layers(c)
        if not lay.is_output
    )
    embed = c.vocab_size * c.hidden_size
    norms = (2 * c.num_hidden_layers + 1) * c.hidden_size
    head = 0 if getattr(c, "tie_word_embeddings", False) else embed
    return embed + linear + norms + head


def is_llama_family(config) -> bool:
    """Configs whose layers llama_linear_layers() spells out (Llama, SmolLM2, Mistral-style)."""
    return _text_config(config).model_type in ("llama", "mistral")


# ---------------------------------------------------------------------------------------------------
# Targets and sizes


def _target_names(target_modules) -> tuple[str, ...]:
    if isinstance(target_modules, str):
        target_modules = target_modules.split(",")
    names = tuple(t.strip() for t in target_modules if t and t.strip())
    if not names:
        raise InputError("No target modules given; name some (e.g. q_proj,v_proj) or use 'all-linear'.")
    return names


def _is_all_linear(names: tuple[str, ...]) -> bool:
    return len(names) == 1 and names[0].lower() == ALL_LINEAR


def select_targets(
    layers: list[LinearLayer], target_modules, model_name: str = "the model"
) -> list[LinearLayer]:
    """The layers a LoRA with these target modules wraps, matched the way peft matches a list of names.

    A name matches a module whose full name equals it or ends with "." + name; "all-linear" takes every
    linear layer except the output head. A name that matches no linear layer is an error listing the names
    there are, since peft would quietly skip it and the count would come out short.
    """
    names = _target_names(target_modules)
    if _is_all_linear(names):
        return [lay for lay in layers if not lay.is_output]
    chosen = [lay for lay in layers if any(lay.name == t or lay.name.endswith("." + t) for t in names)]
    missing = [t for t in names if not any(lay.name == t or lay.name.endswith("." + t) for lay in layers)]
    if missing:
        available = ", ".join(dict.fromkeys(lay.leaf for lay in layers))
        raise InputError(
            f"Target module(s) {', '.join(missing)} not found among the linear layers of {model_name}. "
            f"Its linear layers are: {available}. Use some of these, or 'all-linear'."
        )
    return chosen


def group_modules(layers: list[LinearLayer], r: int) -> tuple[ModuleSize, ...]:
    """Fold the targeted layers into one row per (name, shape), counting the copies, in model order."""
    counts: OrderedDict[tuple[str, int, int], int] = OrderedDict()
    for lay in layers:
        key = (lay.leaf, lay.in_features, lay.out_features)
        counts[key] = counts.get(key, 0) + 1
    return tuple(ModuleSize(name, i, o, r, n) for (name, i, o), n in counts.items())


def _check_lora(lora: LoraSettings) -> None:
    if not isinstance(lora.r, int) or isinstance(lora.r, bool) or lora.r <= 0:
        raise InputError(f"r must be a positive integer, got {lora.r!r}.")
    if not isinstance(lora.alpha, (int, float)) or lora.alpha <= 0:
        raise InputError(f"alpha must be a positive number, got {lora.alpha!r}.")


def adapter_size_from_layers(
    layers: list[LinearLayer], lora: LoraSettings, num_layers: int | None, model_name: str = "the model"
) -> AdapterSize:
    """Pure: the adapter's size from a list of linear layers (from a meta model or from the formula)."""
    _check_lora(lora)
    targets = select_targets(layers, lora.target_modules, model_name)
    names = _target_names(lora.target_modules)
    return AdapterSize(lora.r, lora.alpha, names, group_modules(targets, lora.r), num_layers)


def adapter_size(config, lora: LoraSettings = DEFAULT_LORA, use_formula: bool = False) -> AdapterSize:
    """The adapter's size for a config: from the meta model's real layers, or the Llama formula."""
    config = load_config(config)
    if use_formula and not is_llama_family(config):
        raise InputError(
            f"The step-by-step formula covers the Llama family; {_text_config(config).model_type!r} is sized "
            "from its meta-device model instead (use_formula=False)."
        )
    layers = llama_linear_layers(config) if use_formula else linear_layers(config)
    num_layers = getattr(_text_config(config), "num_hidden_layers", None)
    return adapter_size_from_layers(layers, lora, num_layers, _model_name(config))


def _model_name(config) -> str:
    return (getattr(config, "architectures", None) or [type(config).__name__.replace("Config", "")])[0]


def base_size(config, kept_dtype=None) -> BaseSize:
    """Params and bytes of the base, including NF4 as transformers' bitsandbytes integration loads it.

    Mirrors replace_with_bnb_linear: every nn.Linear / Conv1D becomes 4-bit except the modules
    get_keys_to_not_convert() keeps (lm_head, tied weights) and the model's _keep_in_fp32_modules;
    everything else (embeddings, norms, lm_head, biases) keeps its dtype: the config's unless `kept_dtype`.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = _cached_meta_model(load_config(config), kept_dtype)
    skip = list(
        set(get_keys_to_not_convert(model)) | set(getattr(model, "_keep_in_fp32_modules", None) or ())
    )
    quantized = {}
    for name, module in model.named_modules():
        # the same test replace_with_bnb_linear applies
        if (type(module) is nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skip):
            quantized[id(module.weight)] = module.weight.numel()
    params = quantized_params = kept_bytes = linear_bytes = state_bytes = 0
    kept: OrderedDict[str, int] = OrderedDict()
    dtypes: dict[str, int] = {}
    for name, p in model.named_parameters():
        n = p.numel()
        params += n
        if id(p) in quantized:
            quantized_params += n
            linear_bytes += nf4_bytes(n)
            state_bytes += nf4_quant_state_bytes(n)
            continue
        kept_bytes += n * p.element_size()
        dtypes[str(p.dtype).removeprefix("torch.")] = dtypes.get(str(p.dtype).removeprefix("torch."), 0) + n
        owner_name, _, pname = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        what = type(owner).__name__
        if id(owner.weight if pname == "bias" and hasattr(owner, "weight") else None) in quantized:
            what = "bias of 4-bit layers"
        elif _is_linear(owner):
            what = f"{what} ({owner_name.rsplit('.', 1)[-1]})"
        kept[what] = kept.get(what, 0) + n
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    kept_dtype_name = max(dtypes, key=dtypes.get) if dtypes else "bfloat16"
    return BaseSize(
        params=params,
        quantized_params=quantized_params,
        kept=tuple(kept.items()),
        kept_dtype=kept_dtype_name,
        kept_bytes=kept_bytes,
        nf4_linear_bytes=linear_bytes,
        buffer_bytes=buffer_bytes,
        quant_state_bytes=state_bytes,
    )


def size_report(config, lora: LoraSettings = DEFAULT_LORA, kept_dtype=None) -> SizeReport:
    """Base and adapter sizes for a config (object, path, folder or profile name) and LoRA settings."""
    source = str(resolve_config_path(config)) if isinstance(config, (str, Path)) else "config"
    config = load_config(config)
    return SizeReport(_model_name(config), source, base_size(config, kept_dtype), adapter_size(config, lora))


# ---------------------------------------------------------------------------------------------------
# Presentation


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


# ---------------------------------------------------------------------------------------------------
# Cross-checks: formula, peft's count, the file on disk


@dataclass(frozen=True)
class SafetensorsSummary:
    """What a safetensors file's header says, read without loading a single weight."""

    path: Path
    tensors: int
    params: int
    data_bytes: int  # the tensors' bytes, from their offsets
    header_bytes: int  # 8-byte length plus the JSON header
    file_bytes: int
    dtypes: tuple[str, ...]  # e.g. ("F32",) or ("BF16",)


def read_safetensors_header(path: str | Path) -> SafetensorsSummary:
    """Tensor count, parameter count and bytes from a .safetensors header (8-byte length, then JSON)."""
    from utils.runtime.adapter_files import read_safetensors_header as read_tensors

    path = Path(path)
    tensors = read_tensors(path).values()
    data = sum(t.nbytes for t in tensors)
    file_bytes = path.stat().st_size
    return SafetensorsSummary(
        path,
        len(tensors),
        sum(t.numel for t in tensors),
        data,
        file_bytes - data,
        file_bytes,
        tuple(sorted({t.dtype for t in tensors})),
    )


@dataclass(frozen=True)
class CrossCheckRow:
    """One way of counting the adapter."""

    source: str  # "formula", "peft model", "adapter file"
    tensors: int | None
    params: int | None
    bytes: int | None  # bytes of the weights as this source holds them
    note: str = ""


@dataclass(frozen=True)
class CrossChecks:
    """The adapter counted three ways, side by side; `agree` is True when the parameter counts match."""

    rows: tuple[CrossCheckRow, ...]
    agree: bool
    notes: tuple[str, ...] = field(default_factory=tuple)

    headers = ("source", "tensors", "params", "bytes", "note")

    def table(self) -> list[list[str]]:
        """Rows of strings for a UI table (gr.Dataframe), in `headers` order."""
        fmt = lambda v: "" if v is None else f"{v:,}"  # noqa: E731
        return [[r.source, fmt(r.tensors), fmt(r.params), fmt(r.bytes), r.note] for r in self.rows]


def peft_lora_count(peft_model) -> tuple[int, int, int]:
    """(tensors, params, bytes) of the LoRA weights on a live model, counted from its lora_ parameters.

    Counting by name works on an inference-loaded adapter too, where get_nb_trainable_parameters()
    reports 0 because nothing requires grad.
    """
    tensors = params = nbytes = 0
    for name, p in peft_model.named_parameters():
        if any(part.startswith("lora_") for part in name.split(".")):
            tensors += 1
            params += p.numel()
            nbytes += p.numel() * p.element_size()
    return tensors, params, nbytes


def cross_checks(peft_model, adapter_dir: str | Path | None, config, lora: LoraSettings) -> CrossChecks:
    """The adapter's size three ways: the formula for `config` and `lora`, peft's count on the live model,
    and the adapter file's safetensors header. Where they cannot agree (a bf16 file), the note says why."""
    formula = adapter_size(config, lora)
    rows = [
        CrossCheckRow(
            "formula",
            formula.tensors,
            formula.params,
            formula.bytes_fp32,
            f"r x (in + out) over {formula.tensors // 2} layers, fp32",
        )
    ]
    notes = []
    tensors, params, nbytes = peft_lora_count(peft_model)
    trainable = (
        peft_model.get_nb_trainable_parameters()[0]
        if hasattr(peft_model, "get_nb_trainable_parameters")
        else 0
    )
    peft_note = "lora_A / lora_B parameters on the loaded model"
    if trainable:
        peft_note += f"; get_nb_trainable_parameters() = {trainable:,}"
    rows.append(CrossCheckRow("peft model", tensors, params, nbytes, peft_note))
    counts = [formula.params, params]

    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        file = adapter_dir / ADAPTER_FILE
        if file.is_file():
            s = read_safetensors_header(file)
            note = f"{', '.join(s.dtypes)}; file {s.file_bytes:,} bytes = {s.header_bytes:,} header + data"
            rows.append(CrossCheckRow("adapter file", s.tensors, s.params, s.data_bytes, note))
            counts.append(s.params)
            per_param = {SAFETENSORS_BYTES.get(d) for d in s.dtypes}
            if per_param != {4}:
                sizes = ", ".join(str(n) for n in sorted(per_param, key=str))
                notes.append(
                    f"The file stores {', '.join(s.dtypes)} ({sizes} bytes per param), so its bytes differ "
                    "from the fp32 formula; the params are what must agree. "
                    "peft loads the weights into fp32 by default."
                )
        elif (adapter_dir / "adapter_model.bin").is_file():
            size = (adapter_dir / "adapter_model.bin").stat().st_size
            rows.append(
                CrossCheckRow("adapter file", None, None, size, "adapter_model.bin: pickle, not read")
            )
            notes.append("The adapter is a pickled .bin file; its header cannot be read without loading it.")
        else:
            notes.append(f"No {ADAPTER_FILE} in {adapter_dir}.")
        cfg_file = adapter_dir / "adapter_config.json"
        if cfg_file.is_file():
            try:
                saved = json.loads(cfg_file.read_text())
            except ValueError:
                saved = {}
            if saved.get("r") not in (None, lora.r):
                notes.append(f"adapter_config.json has r = {saved['r']}, the formula used r = {lora.r}.")
            saved_targets = saved.get("target_modules")
            if isinstance(saved_targets, list) and set(saved_targets) != set(
                _target_names(lora.target_modules)
            ):
                notes.append(
                    f"adapter_config.json targets {', '.join(sorted(saved_targets))}; "
                    f"the formula used {', '.join(_target_names(lora.target_modules))}."
                )
    if params and nbytes != 4 * params:
        notes.append(f"The live adapter weights are not fp32 ({nbytes / params:g} bytes per param).")
    agree = len(set(counts)) == 1
    if not agree:
        notes.append(
            "The parameter counts differ: check that r and the target modules match the adapter's "
            "adapter_config.json."
        )
    return CrossChecks(tuple(rows), agree, tuple(notes))


# ---------------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_number(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return int(value) if value.is_integer() else value


def main(argv: list[str] | None = None) -> int:
    """`python -m utils.analysis.sizing CONFIG [--r 32] [--alpha 64] [--target-modules ...] [--json]`."""
    parser = _Parser(
        prog="python -m utils.analysis.sizing",
        description="LoRA adapter and base-model sizes for a causal-LM config, computed step by step.",
    )
    parser.add_argument(
        "config", help=f"config.json, a folder holding one, or a profile ({', '.join(PROFILES)})"
    )
    parser.add_argument("--r", type=_positive_int, default=None, help="LoRA rank (default 32)")
    parser.add_argument("--alpha", type=_positive_number, default=None, help="LoRA alpha (default 64)")
    parser.add_argument(
        "--target-modules",
        default=None,
        help="comma-separated module names, or all-linear (default q_proj,k_proj,v_proj,o_proj)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--kept-dtype", default=None, help="dtype of the layers NF4 leaves alone (default: config's)"
    )
    args = parser.parse_args(argv)

    default = PROFILES[args.config].lora if args.config in PROFILES else LoraSettings()
    try:
        lora = LoraSettings(
            r=args.r if args.r is not None else default.r,
            alpha=args.alpha if args.alpha is not None else default.alpha,
            dropout=default.dropout,
            target_modules=_target_names(args.target_modules)
            if args.target_modules
            else default.target_modules,
        )
        if args.kept_dtype is not None and args.kept_dtype not in ("float32", "bfloat16", "float16"):
            raise InputError(f"--kept-dtype must be float32, bfloat16 or float16, got {args.kept_dtype!r}.")
        report = size_report(args.config, lora, args.kept_dtype)
    except LoraLensError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    if args.json:
        print(json.dumps(report_json(report), indent=2))
    else:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
