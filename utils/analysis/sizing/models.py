"""Shapes from a config: the model built on the meta device (no weights, no memory; GQA, fused qkv_proj, tied
embeddings and biases come out right), its linear layers, the pure Llama formula as a check, the targets a
LoRA selects, and the adapter and base sizes they give."""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

from utils.analysis.sizing.formula import (
    ALL_LINEAR,
    DEFAULT_LORA,
    SHIPPED_SMOLLM2_CONFIG,
    AdapterSize,
    BaseSize,
    LinearLayer,
    ModuleSize,
    SizeReport,
    nf4_bytes,
    nf4_quant_state_bytes,
)
from utils.core.errors import InputError, LoraLensError
from utils.core.profiles import PROFILES, LoraSettings


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


def target_names(target_modules) -> tuple[str, ...]:
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
    names = target_names(target_modules)
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
    names = target_names(lora.target_modules)
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


__all__ = [
    "adapter_size",
    "adapter_size_from_layers",
    "base_size",
    "build_meta_model",
    "embedded_config_path",
    "group_modules",
    "is_llama_family",
    "linear_layers",
    "llama_base_params",
    "llama_linear_layers",
    "load_config",
    "model_linear_layers",
    "resolve_config_path",
    "select_targets",
    "size_report",
    "target_names",
]
