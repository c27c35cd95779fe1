"""Files that ship a fine-tune, written from the adapter's own files (never from the served model's memory):

- a peft folder of the adapter at a strength s: every lora_B (and its bias, where LoRA has one) multiplied by
  s, adapter_config.json unchanged, so peft and vLLM load it as is and run base + s · (alpha / r) · B A;
- a GGUF LoRA for llama.cpp, as llama.cpp's convert_lora_to_gguf.py writes one (see `write_gguf_lora`);
- a merged model as safetensors (`save_merged`): the base with the update baked in by one of the merge routes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from utils.core.errors import InputError
from utils.runtime.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config

_LLAMA_NAMES = {  # a Llama layer's HF module name -> llama.cpp's tensor name (gguf-py's tensor_mapping)
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_scaled_adapter(adapter_dir: Path, strength: float, out_dir: Path) -> Path:
    """The adapter at strength s as a peft folder: lora_B (and a LoRA bias) times s; everything else as is."""
    from safetensors.torch import load_file, save_file

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    scaled = {}
    for key, tensor in tensors.items():
        if ".lora_B." in key:
            tensor = (tensor.float() * float(strength)).to(tensor.dtype)
        scaled[key] = tensor.contiguous()
    save_file(scaled, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    shutil.copyfile(adapter_dir / ADAPTER_CONFIG, out_dir / ADAPTER_CONFIG)
    (out_dir / "README.md").write_text(
        f"LoRA adapter scaled to strength s = {strength:g} by LoRA Lens: every lora_B multiplied by s, so\n"
        f"loaded as is it computes base(x) + s * (alpha / r) * B A x. Source: {adapter_dir.name}.\n"
    )
    return out_dir


def _llama_tensor_name(key: str) -> tuple[str, str] | None:
    """("blk.N.attn_q.weight", "lora_a" | "lora_b") for a peft key of a Llama layer, else None."""
    parts = key.split(".")
    if "layers" not in parts or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
        return None
    i = parts.index("layers")
    block, module = int(parts[i + 1]), ".".join(parts[i + 2 : -2])
    if module not in _LLAMA_NAMES:
        return None
    return f"blk.{block}.{_LLAMA_NAMES[module]}.weight", "lora_a" if parts[-2] == "lora_A" else "lora_b"


def _permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py): the rows of q and k re-ordered for its rotary
    layout; applied to lora_B only (its rows are the projection's outputs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf_lora(adapter_dir: Path, base_config: dict, out_file: Path, outtype: str = "f32") -> Path:
    """The adapter as a GGUF LoRA for llama.cpp, with what its convert_lora_to_gguf.py writes for a Llama base:
    general.architecture "llama", general.type "adapter", adapter.type "lora", adapter.lora.alpha; per adapted
    weight `blk.N.<name>.weight.lora_a` ([r, in]) and `.lora_b` ([out, r]), q_proj's and k_proj's lora_B rows
    permuted as the base's q and k are (llama.cpp's loader takes the rank from lora_b and scales by alpha / r);
    f32 by default (the converter's default), or f16."""
    import gguf
    from safetensors.torch import load_file

    config = read_adapter_config(Path(adapter_dir))
    if base_config.get("model_type") != "llama":
        raise InputError(
            f"GGUF LoRA export is written for Llama bases; this base is {base_config.get('model_type')!r}."
        )
    if outtype not in ("f16", "f32"):
        raise InputError("outtype must be f16 or f32.")
    n_head = int(base_config["num_attention_heads"])
    n_head_kv = int(base_config.get("num_key_value_heads") or n_head)
    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    writer = gguf.GGUFWriter(str(out_file), "llama")
    writer.add_name(Path(adapter_dir).name)
    writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config.get("lora_alpha", config.get("r", 8))))
    dtype = torch.float16 if outtype == "f16" else torch.float32
    written = 0
    for key in sorted(tensors):
        named = _llama_tensor_name(key)
        if named is None:
            if ".lora_" in key:
                raise InputError(
                    f"{key} has no llama.cpp name: only q/k/v/o and the MLP of Llama layers convert."
                )
            continue
        name, part = named
        data = tensors[key].float()
        if part == "lora_b" and ".attn_q." in name:
            data = _permute(data, n_head, n_head)
        elif part == "lora_b" and ".attn_k." in name:
            data = _permute(data, n_head, n_head_kv)
        writer.add_tensor(f"{name}.{part}", data.to(dtype).numpy())
        written += 1
    if written == 0:
        raise InputError("The adapter has no LoRA tensors llama.cpp can apply.")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out_file)


def save_merged(pair, layers, route: str, out_dir: Path) -> Path:
    """The base with the adapter merged by `route` as a safetensors model: for nf4, the re-quantized 4-bit
    model as bitsandbytes serializes it; for bf16 / fp16 / fp32, every weight de-quantized, the adapted ones
    plus ΔW, in that dtype; for original, the base's own weights plus ΔW in float32. One copy in memory: run it
    where the base fits in that dtype (a CLI, not a browser download)."""
    from utils.runtime.loading import load_base
    from utils.runtime.merging import ROUTE_DTYPES, build_merged_model

    if route in ("nf4", "original"):
        model = build_merged_model(pair, layers, route)
    else:
        model, _ = load_base(pair.profile, pair.settings, "cpu")
        _dequantize_linears(model)
        adapted = {lw.name.removeprefix("base_model.model."): lw for lw in layers}
        for name, module in model.named_modules():
            if name in adapted:
                lw = adapted[name]
                # the served 4-bit weight, as the merge check reads it, plus the update
                module.weight.data = lw.base_weight() + (lw.b.float() @ lw.a.float()) * lw.scaling
        torch.nn.Module.to(
            model, ROUTE_DTYPES[route]
        )  # transformers refuses .to(dtype) on a loaded-in-4-bit model
        model.config.dtype = ROUTE_DTYPES[route]
    model.save_pretrained(str(out_dir), safe_serialization=True)
    pair.tokenizer.save_pretrained(str(out_dir))
    (Path(out_dir) / "lora-lens-merge.json").write_text(json.dumps({"route": route}))
    return Path(out_dir)


def _dequantize_linears(model) -> None:
    """Every 4-bit linear layer replaced by a float32 torch Linear of its de-quantized weight; the model's
    record of its quantization removed, so it saves as a plain model."""
    import bitsandbytes as bnb

    from utils.runtime.weights import base_weight

    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            parent_name, _, child = name.rpartition(".")
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.data = base_weight(module)
            if module.bias is not None:
                dense.bias.data = module.bias.data.float()
            setattr(model.get_submodule(parent_name), child, dense)
    for attribute in ("quantization_config",):
        if hasattr(model.config, attribute):
            delattr(model.config, attribute)
    model.hf_quantizer = None
    for flag in ("is_loaded_in_4bit", "is_quantized"):
        if hasattr(model, flag):
            setattr(model, flag, False)
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
