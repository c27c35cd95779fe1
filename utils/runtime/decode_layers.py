"""A Llama decoder layer's CPU decode step in two compiled calls instead of about 40 Python-driven operations.

Where the project's 4-bit kernel serves a model (utils/runtime/nf4_kernel.py), a decode step's arithmetic takes about
two thirds of its time; the other third is Python: transformers' LlamaDecoderLayer, its attention, MLP and
norm modules, peft's LoRA wrappers and the strength router run some 40 small torch operations and 15 module
calls per layer, 30 layers a token (py-spy over the embedded default). csrc/decode_layer.cpp runs the layer
from C++ (ATen's operations, and csrc/decode_math.cpp's loops for the attention, norms and silu, which ATen's
set-up made slower than their arithmetic): `decode_attention_inputs` (input norm, q/k/v, rotary embedding)
and `decode_layer_output` (attention, output projection, residuals, MLP), with
the key/value cache update between them left to transformers' own Cache object. The 4-bit products and the
LoRA updates are the kernels the layers call anyway, with each LoRA layer's factor (strength x alpha / r) per
batch row from the engine's strength plan, so the results are the plain path's up to float32 rounding (tests
compare logits within 2e-5 of the largest, and greedy answers token for token).

Where every decoder layer of the model is served so, utils/runtime/decode_stack.py runs all of them in one
call.

It serves only what it reproduces exactly: LlamaDecoderLayer with sdpa attention, float32 on the CPU without
autograd, one new token per row and at most MAX_FUSED_ROWS rows, no attention mask (no padding), every linear
layer a 4-bit layer the kernel serves (with a plain LoRA update the router can fuse, where there is one), no
hooks on the layer's modules. Anything else, and every prefill, takes the layer's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.modules import module as torch_module

from utils.runtime import nf4_kernel

# hooks registered for every module (torch.nn.modules.module.register_module_forward_hook and _pre_hook)
GLOBAL_HOOK_TABLES = (torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks)


@dataclass
class DecodeLayerSwitch:
    """Benchmarks and tests compare the compiled layer with transformers' own in one process via `enabled`."""

    enabled: bool = True
    stack: bool = (
        True  # the decoder's layers in one call (DecodeStack) where they all take the compiled layer
    )
    one_region: bool = (
        True  # that call's layers in one parallel region (csrc/decode_layer.cpp: one_region_stack)
    )
    whole_step: bool = True  # a greedy run's whole steps, several a compiled call (decode_steps)


SWITCH = DecodeLayerSwitch()


@dataclass(frozen=True)
class _Packed:
    """One layer's weights in the lists the compiled calls take, for one strength plan."""

    attention_tensors: list
    attention_ints: list
    output_tensors: list
    output_ints: list


def speed_up_decoder_layers(model) -> int:
    """Route the decode steps of the model's Llama decoder layers through csrc/decode_layer.cpp where the
    kernel library is loaded; returns how many layers now take it (0 where none can). Call it before or after
    peft attaches an adapter: each step looks the layer's linear modules up afresh."""
    if not nf4_kernel.STATE.registered or not hasattr(torch.ops.lora_lens, "decode_layer_output"):
        return 0
    if not any(m.__dict__.get("lora_lens_with_update") for m in model.modules()):
        return 0  # the kernel does not serve this model's 4-bit layers (nf4_kernel.prepare)
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP, LlamaRMSNorm

    for layer in model.modules():
        if (
            type(layer) is LlamaDecoderLayer
            and not layer.__dict__.get("_lora_lens_decode_layer")
            and type(layer.mlp) is LlamaMLP
            and type(layer.mlp.act_fn) in (SiLUActivation, torch.nn.SiLU)
            and type(layer.input_layernorm) is LlamaRMSNorm
            and type(layer.post_attention_layernorm) is LlamaRMSNorm
        ):
            _take_decode_steps(layer)
    return compiled_layers(model)


def compiled_layers(model) -> int:
    """How many of the model's decoder layers take their decode steps through the compiled calls."""
    return sum(1 for layer in model.modules() if layer.__dict__.get("_lora_lens_decode_layer"))


def _take_decode_steps(layer) -> None:
    from transformers.integrations.sdpa_attention import use_gqa_in_sdpa

    plain = layer.forward
    attention, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    head_dim = int(attention.head_dim)
    probe = torch.empty(1, 1, 1, head_dim)
    groups = int(getattr(attention, "num_key_value_groups", 1))
    # as sdpa_attention_forward decides for one new token without a mask; its other (pack_gqa) way is not here
    enable_gqa = groups > 1 and bool(use_gqa_in_sdpa(None, probe, probe))
    serves_gqa = groups == 1 or enable_gqa
    cached: dict = {"linears": None}

    def packed_for(rows: int) -> _Packed | None:
        # Looked up on every step: peft puts its LoRA layers in place of the 4-bit ones after this was set up.
        in_attention, in_mlp = attention._modules, mlp._modules
        linears = (
            in_attention["q_proj"],
            in_attention["k_proj"],
            in_attention["v_proj"],
            in_attention["o_proj"],
            in_mlp["gate_proj"],
            in_mlp["up_proj"],
            in_mlp["down_proj"],
        )
        if cached["linears"] != linears:
            lora_layers = [m for m in linears if "lora_A" in m._modules]
            bases = [m._modules["base_layer"] for m in lora_layers]
            # every module whose hooks the plain path would run: with any hook set, that path runs (the tables
            # are the modules' own dicts, which registering and removing a hook change in place)
            watched = [layer, attention, mlp, *norms, *linears, *bases]
            hook_tables = [t for m in watched for t in (m._forward_hooks, m._forward_pre_hooks)]
            cached.update(linears=linears, lora=lora_layers, hook_tables=[*GLOBAL_HOOK_TABLES, *hook_tables])
            cached.pop("packed", None)
        if any(cached["hook_tables"]):
            return None
        plan = None
        if cached["lora"]:  # LoRA layers run through the engine's strength router, with its plan set
            route = cached["lora"][0].__dict__.get("_lora_lens_route")
            plan = route[0].plan if route is not None else None
            if plan is None or plan.rows != rows:
                return None  # peft's own path, or the router's clear error on a batch of another size
        known = cached.get("packed")
        if known is not None and known[0] is plan:
            return known[1]
        specs = [_linear_spec(module, plan) for module in linears]
        entry = None
        if all(spec is not None for spec in specs):
            attention_tensors, attention_ints = _flatten(specs[:3])
            output_tensors, output_ints = _flatten(specs[3:])
            entry = _Packed(attention_tensors, attention_ints, output_tensors, output_ints)
        cached["packed"] = (plan, entry)  # None too: a layer it cannot serve is not examined again each step
        return entry

    def forward(
        hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=False,
        position_embeddings=None,
        **kwargs,
    ):
        packed = None
        if (
            SWITCH.enabled
            and nf4_kernel.STATE.enabled
            and serves_gqa
            and (not kwargs or only_switched_off(kwargs))
            and attention_mask is None
            and past_key_values is not None
            and position_embeddings is not None
            and hidden_states.dtype == torch.float32
            and hidden_states.device.type == "cpu"
            and hidden_states.dim() == 3
            and hidden_states.shape[1] == 1
            and hidden_states.shape[0] <= nf4_kernel.MAX_FUSED_ROWS
            and not torch.is_grad_enabled()
            and attention.config._attn_implementation == "sdpa"
        ):
            packed = packed_for(hidden_states.shape[0])
        if packed is None:
            return plain(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        cos, sin = position_embeddings
        ops = torch.ops.lora_lens
        query, key, value = ops.decode_attention_inputs(
            hidden_states,
            norms[0].weight,
            norms[0].variance_epsilon,
            cos,
            sin,
            head_dim,
            packed.attention_tensors,
            packed.attention_ints,
        )
        keys, values = past_key_values.update(key, value, attention.layer_idx)
        return ops.decode_layer_output(
            hidden_states,
            query,
            keys,
            values,
            attention.scaling,
            enable_gqa,
            norms[1].weight,
            norms[1].variance_epsilon,
            packed.output_tensors,
            packed.output_ints,
        )

    layer.forward = forward
    layer._lora_lens_decode_layer = True
    layer._lora_lens_decode_info = _LayerInfo(
        packed_for=packed_for,
        norms=norms,
        head_dim=head_dim,
        enable_gqa=enable_gqa,
        serves_gqa=serves_gqa,
        scaling=float(attention.scaling),
    )


@dataclass(frozen=True)
class _LayerInfo:
    """What DecodeStack needs of a layer that takes the compiled decode steps."""

    packed_for: object  # rows -> _Packed, or None where the compiled calls cannot serve this step
    norms: tuple
    head_dim: int
    enable_gqa: bool
    serves_gqa: bool  # a grouping of heads the compiled call reproduces (sdpa attention is checked per step)
    scaling: float


# what transformers passes down when the model is called directly; off, they change nothing in a layer
_HARMLESS_WHEN_OFF = frozenset(("output_attentions", "output_hidden_states"))


def only_switched_off(kwargs: dict) -> bool:
    return all(key in _HARMLESS_WHEN_OFF and not value for key, value in kwargs.items())


def _linear_spec(module, plan):
    """(kernel arguments, bias, LoRA (stacked A, stacked B, factors, spans) or None) for one linear layer under this plan, or None
    where the compiled layer cannot reproduce it."""
    lora = None
    base = module
    if hasattr(module, "lora_A"):  # a peft LoRA layer: served only through the engine's strength router
        route = module.__dict__.get("_lora_lens_route")
        if route is None or plan is None:
            return None
        index = route[1]
        base = module.base_layer
        if plan.active[index]:
            fused = plan.fused[index]
            if fused is None:
                return None
            lora = (fused[1], fused[2], plan.factors[index], plan.spans[index])
    served_by_kernel = base.__dict__.get("lora_lens_with_update") is not None  # nf4_kernel.direct_forward
    if not served_by_kernel or base.compute_dtype not in (None, torch.float32):
        return None
    weight = base._parameters["weight"]
    args = nf4_kernel.kernel_args_for(weight)
    if args is None:
        return None
    return args, base._parameters.get("bias"), lora


def _flatten(specs) -> tuple[list, list]:
    """The per-linear lists csrc/decode_layer.cpp reads: 11 tensors and 3 ints each."""
    tensors, ints = [], []
    for (packed, n, k, absmax, blocksize, code, absmax8, code2, offset), bias, lora in specs:
        lora_a, lora_b_t, factors, spans = lora if lora is not None else (None, None, None, None)
        tensors += [packed, absmax, code, absmax8, code2, offset, bias, lora_a, lora_b_t, factors, spans]
        ints += [n, k, blocksize]
    return tensors, ints
