"""The strength router: every LoRA layer computes `base(x) + s · (alpha / r) · B A x` with `s` per batch row.

peft can only switch an adapter on or off per row (`adapter_names`), and does it by splitting the batch in every
layer; its global `scaling` cannot differ between rows. The router replaces each LoRA linear layer's forward
once, at start, so base (s = 0), fine-tune (s = 1) and any other strength, per row and per layer, share one
batched pass, and choosing the strengths for a request is one attribute write. Its forward keeps peft's flat
shape: no plan -> peft; inactive layer -> base; fused kernel -> one call; else base + update.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.core.errors import GenerationError, InputError
from utils.runtime.loading import ADAPTER_NAME


class StrengthRouter:
    """Every LoRA layer computes `base(x) + s · (alpha / r) · B A x` with `s` set per batch row (and per layer).

    peft can only switch an adapter on or off per row (`adapter_names`), and does it by splitting the batch in
    every layer; its global `scaling` cannot differ between rows. Here each LoRA linear layer's forward is
    replaced once, at start, by one that adds its low-rank update times a per-row factor, so base (s = 0),
    fine-tune (s = 1) and any other strength share one batched pass, and choosing the strengths for a request
    is one attribute write. Only the engine, holding its lock, sets a plan; with no plan (None) every layer
    runs peft's own forward, so peft's API keeps working on the model.
    """

    def __init__(self, model, adapter_name: str = ADAPTER_NAME):
        from peft.tuners.lora import LoraLayer

        self.adapter_name = adapter_name
        self.names: list[str] = []
        self.layers: list = []
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {}):
                _check_scalable(name, module, adapter_name)
                self.names.append(name)
                self.layers.append(module)
        self.scalings = [float(m.scaling[adapter_name]) for m in self.layers]
        # per layer: (base layer, lora_A, lora_B, dropout), looked up once instead of in every call
        self.parts = [
            (m.base_layer, m.lora_A[adapter_name], m.lora_B[adapter_name], m.lora_dropout[adapter_name])
            for m in self.layers
        ]
        self.plan: _Plan | None = None
        for index, layer in enumerate(self.layers):
            layer.forward = functools.partial(self._forward, index, layer, layer.forward)
            # (router, position in a plan's per-layer lists): how the compiled decode layer
            # (utils/decode_layers.py) finds the plan for the LoRA layers it meets
            layer.__dict__["_lora_lens_route"] = (self, index)

    def plan_for(self, rows: list) -> _Plan:
        """A plan for a batch: each row is one strength for every layer, or a list of one per layer (in
        the order of `self.names`). Call with the model's lock held, then set `self.plan`.

        Example: plan_for([0.0, 1.0]) -> base in row 0, fine-tune in row 1 (s · alpha / r per layer)
        """
        n = len(self.layers)
        per_row = [[float(s)] * n if isinstance(s, (int, float)) else [float(v) for v in s] for s in rows]
        if any(len(row) != n for row in per_row):
            raise InputError(f"A per-layer strength list needs {n} values, one per LoRA layer.")
        # [layers, rows] of s x alpha / r, built in Python: a request pays one tensor creation, not one per layer
        factors = [[row[i] * scaling for row in per_row] for i, scaling in enumerate(self.scalings)]
        active = [any(f != 0 for f in layer) for layer in factors]
        weight = self.layers[0].lora_A[self.adapter_name].weight if self.layers else None
        device = weight.device if weight is not None else "cpu"
        dtype = weight.dtype if weight is not None else torch.float32
        factors = (
            torch.tensor(factors, dtype=torch.float64).reshape(n, len(rows)).to(dtype=dtype, device=device)
        )
        fused = [
            self._fused_call(parts) if on else None for parts, on in zip(self.parts, active, strict=True)
        ]
        return _Plan(len(rows), factors.unbind(0), active, fused)

    @staticmethod
    def _fused_call(parts):
        """(call, lora_A weight, lora_B weight) where the base layer's CPU 4-bit kernel adds the update in the
        same call (utils/nf4_kernel.py: `lora_lens_with_update`), else None."""
        base, lora_A, lora_B, dropout = parts
        call = base.__dict__.get("lora_lens_with_update")
        # the parameter dicts, not Module.__getattr__: a request builds this for every LoRA layer
        a, b = lora_A._parameters, lora_B._parameters
        if call is None or dropout.training or a.get("bias") is not None or b.get("bias") is not None:
            return None
        return call, a["weight"], b["weight"]

    def _forward(self, index, layer, peft_forward, x, *args, **kwargs):
        plan = self.plan
        if plan is None or "adapter_names" in kwargs:
            return peft_forward(x, *args, **kwargs)
        base_layer, lora_A, lora_B, dropout = self.parts[index]
        if not plan.active[index]:  # every row has strength 0 here: the update would add zeros
            return base_layer(x, *args, **kwargs)
        if x.shape[0] != plan.rows:
            raise GenerationError(f"The strength plan has {plan.rows} rows but the batch has {x.shape[0]}.")
        fused = plan.fused[index]
        if fused is not None and not (args or kwargs):
            # The same arithmetic in one kernel call, or None where the kernel does not serve this input.
            result = fused[0](x, fused[1], fused[2], plan.factors[index])
            if result is not None:
                return result
        # peft's own arithmetic (B(A(dropout(x))) * factor, then added), with the modules' weights called
        # directly: a decode step runs this in every LoRA layer, where module calls cost more than the math.
        result = base_layer(x, *args, **kwargs)
        if x.dtype != lora_A.weight.dtype:
            x = x.to(lora_A.weight.dtype)
        if dropout.training:
            x = dropout(x)
        update = F.linear(F.linear(x, lora_A.weight, lora_A.bias), lora_B.weight, lora_B.bias)
        update.mul_(plan.factors[index].view(-1, *([1] * (x.dim() - 1))))
        if update.dtype != result.dtype:
            update = update.to(result.dtype)
        return result.add_(update) if not result.requires_grad else result + update


@dataclass(frozen=True)
class _Plan:
    rows: int  # batch rows the plan is for
    factors: tuple  # per layer, [rows] of strength x alpha / r in the LoRA weights' dtype and device
    active: list[bool]  # per layer: does any row have a non-zero strength there
    fused: list  # per layer: (kernel call, lora_A weight, lora_B weight) where the CPU kernel adds the update


def _check_scalable(name: str, module, adapter_name: str) -> None:
    """Only plain LoRA on linear layers has the `B A x` form that a per-row factor scales."""
    import torch.nn as nn

    if adapter_name in getattr(module, "lora_variant", {}) or not isinstance(
        module.lora_A[adapter_name], nn.Linear
    ):
        raise InputError(
            f"The adapter's layer {name} is not a plain LoRA linear layer (DoRA, embedding or convolution "
            "adapters are not supported): LoRA Lens scales B A x per row."
        )


def strength_router(model) -> StrengthRouter | None:
    """The model's one router and lock, made on first use (None for the router when no adapter is attached)."""
    shared = shared_state(model)
    return shared["router"]


def shared_state(model) -> dict:
    # The lock and the router belong to the model, not to an Engine: two engines over one model (tests, an
    # app rebuilt around a loaded pair) must still serialise and must not wrap the layers twice.
    shared = getattr(model, "_lora_lens_shared", None)
    if shared is None:
        has_adapter = hasattr(model, "peft_config") and ADAPTER_NAME in model.peft_config
        shared = {"lock": threading.Lock(), "router": StrengthRouter(model) if has_adapter else None}
        model._lora_lens_shared = shared
    return shared


@contextmanager
def row_strengths(model, rows: list):
    """Run the model with these per-row strengths (the caller holds the model's lock); restores peft after.

    Example: with row_strengths(model, [0, 1]): model.generate(...)  # row 0 base, row 1 fine-tuned
    """
    router = strength_router(model)
    if router is None:
        if any(_nonzero(s) for s in rows):
            raise InputError("No adapter is loaded (base-only): every strength must be 0.")
        yield
        return
    router.plan = router.plan_for(rows)
    try:
        yield
    finally:
        router.plan = None


def _nonzero(strength) -> bool:
    return (
        any(float(v) != 0 for v in strength) if isinstance(strength, (list, tuple)) else float(strength) != 0
    )
