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
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.core.errors import GenerationError, InputError
from utils.runtime.loading import ADAPTER_NAME


class StrengthRouter:
    """Every LoRA layer computes `base(x) + s · (alpha / r) · B A x` with the adapter and `s` set per batch row
    (and `s` per layer).

    peft can only switch an adapter on or off per row (`adapter_names`), and does it by splitting the batch in
    every layer; its global `scaling` cannot differ between rows. Here each LoRA linear layer's forward is
    replaced once, at start, by one that adds its low-rank update times a per-row factor, so base (s = 0),
    fine-tune (s = 1), any other strength and any of the loaded adapters share one batched pass, and choosing
    them for a request is one attribute write. Only the engine, holding its lock, sets a plan; with no plan
    (None) every layer runs peft's own forward, so peft's API keeps working on the model.

    Several adapters are stacked per layer: their lora_A weights one under the other ([sum of r, in]) and their
    lora_B weights side by side ([out, sum of r]), in one tensor each, and peft's parameters become views of
    those tensors, so the stack costs no memory. A row's span (start, rank) picks its adapter's block.
    """

    def __init__(self, model, adapter_names: Sequence[str] | None = None):
        from peft.tuners.lora import LoraLayer

        # peft's names of the adapters, the primary (ADAPTER_NAME) first; a plan refers to them by position
        if adapter_names is None:
            adapter_names = [ADAPTER_NAME] + [
                n for n in getattr(model, "peft_config", {}) if n != ADAPTER_NAME
            ]
        self.adapter_names = list(adapter_names)
        self.adapter_name = self.adapter_names[0]
        self.names: list[str] = []
        self.layers: list = []
        for name, module in model.named_modules():
            present = [a for a in self.adapter_names if a in getattr(module, "lora_A", {})]
            if isinstance(module, LoraLayer) and present:
                for adapter in present:
                    _check_scalable(name, module, adapter)
                self.names.append(name)
                self.layers.append(module)
        self.stacks = [_stack(layer, self.adapter_names) for layer in self.layers]
        self._transposed: dict = {}  # stack index -> (lora_B's version, lora_B transposed), see _fused_call
        # the primary adapter's alpha / r per layer (0 where it has no update): the single-adapter views read it
        self.scalings = [stack.spans[0][2] if 0 in stack.spans else 0.0 for stack in self.stacks]
        self.plan: _Plan | None = None
        for index, layer in enumerate(self.layers):
            layer.forward = functools.partial(self._forward, index, layer, layer.forward)
            # (router, position in a plan's per-layer lists): how the compiled decode layer
            # (utils/decode_layers.py) finds the plan for the LoRA layers it meets
            layer.__dict__["_lora_lens_route"] = (self, index)

    def layers_of(self, adapter: int) -> list[int]:
        """Positions (in `names`) of the layers the adapter at this position adapts."""
        return [i for i, stack in enumerate(self.stacks) if adapter in stack.spans]

    def plan_for(self, rows: list, adapters: Sequence[int | None] | None = None) -> _Plan:
        """A plan for a batch: each row is one strength for every layer, or a list of one per layer (in
        the order of `self.names`), of the adapter at that row's position in `adapters` (by default the
        primary; None = the base). Call with the model's lock held, then set `self.plan`.

        Example: plan_for([0.0, 1.0, 1.0], adapters=[None, 0, 2]) -> base, the primary adapter, the third one
        """
        n = len(self.layers)
        adapters = [0] * len(rows) if adapters is None else list(adapters)
        if len(adapters) != len(rows):
            raise InputError("A plan needs one adapter (or None) per row.")
        if any(a is not None and not 0 <= a < len(self.adapter_names) for a in adapters):
            raise InputError(f"An adapter position lies outside the {len(self.adapter_names)} loaded.")
        per_row = [[float(s)] * n if isinstance(s, (int, float)) else [float(v) for v in s] for s in rows]
        if any(len(row) != n for row in per_row):
            raise InputError(f"A per-layer strength list needs {n} values, one per LoRA layer.")
        # [layers, rows] of s x alpha / r and of (start, rank), built in Python: a request pays a few tensor
        # creations, not some per layer
        factors, spans, single, active = [], [], [], []
        for i, stack in enumerate(self.stacks):
            layer_factors, layer_spans, used = [], [], set()
            for adapter, row in zip(adapters, per_row, strict=True):
                span = stack.spans.get(adapter) if adapter is not None else None
                if span is None or row[i] == 0:
                    layer_factors.append(0.0)
                    layer_spans.append((0, 0))
                else:
                    layer_factors.append(row[i] * span[2])
                    layer_spans.append((span[0], span[1]))
                    used.add(adapter)
            factors.append(layer_factors)
            spans.append(layer_spans)
            active.append(bool(used))
            single.append(next(iter(used)) if len(used) == 1 else None)
        weight = self.stacks[0].a if self.stacks else None
        device = weight.device if weight is not None else "cpu"
        dtype = weight.dtype if weight is not None else torch.float32
        factor_table = torch.tensor(factors, dtype=torch.float64).reshape(n, len(rows)).to(dtype=dtype)
        mixed = [on and one is None for on, one in zip(active, single, strict=True)]
        fused = [self._fused_call(i) if on else None for i, on in enumerate(active)]
        # the spans only where the kernel or a batch of several adapters reads them (a request pays for them
        # only then)
        span_table = (
            torch.tensor(spans, dtype=torch.long).reshape(n, len(rows), 2)
            if any(mixed) or any(f is not None for f in fused)
            else None
        )
        mix = _mix_masks(self.stacks, dtype, span_table, mixed, device)
        return _Plan(
            len(rows),
            factor_table.to(device).unbind(0),
            span_table.unbind(0) if span_table is not None else (None,) * n,
            active,
            single,
            mix,
            fused,
            tuple(adapters),
        )

    def _fused_call(self, index: int):
        """(call, stacked lora_A, stacked lora_B) where the base layer's CPU 4-bit kernel adds the update in
        the same call (utils/nf4_kernel.py: `lora_lens_with_update`), else None."""
        stack = self.stacks[index]
        call = stack.base.__dict__.get("lora_lens_with_update")
        if call is None or not stack.exact:
            return None
        return call, stack.a, _transposed(self._transposed, index, stack.b)

    def _forward(self, index, layer, peft_forward, x, *args, **kwargs):
        plan = self.plan
        if plan is None or "adapter_names" in kwargs:
            return peft_forward(x, *args, **kwargs)
        stack = self.stacks[index]
        if not plan.active[index]:  # every row has strength 0 here: the update would add zeros
            return stack.base(x, *args, **kwargs)
        if x.shape[0] != plan.rows:
            raise GenerationError(f"The strength plan has {plan.rows} rows but the batch has {x.shape[0]}.")
        fused = plan.fused[index]
        if fused is not None and not (args or kwargs):
            # The same arithmetic in one kernel call, or None where the kernel does not serve this input.
            result = fused[0](x, fused[1], fused[2], plan.factors[index], plan.spans[index])
            if result is not None:
                return result
        result = stack.base(x, *args, **kwargs)
        one = plan.single[index]
        if one is not None:
            update = _adapter_update(x, *stack.parts[one], plan.factors[index])
        elif stack.exact:
            # Rows on different adapters: the stacked A x, each row's own block kept (zeros elsewhere), the
            # stacked B, then each row's factor, in peft's order: four operations however many adapters share
            # the batch. (The factor after B, as peft: before it, the rounding would differ from peft's.)
            shape = (x.shape[0], *([1] * (x.dim() - 2)), -1)
            down = F.linear(x.to(stack.a.dtype), stack.a)
            down.mul_(plan.mix[index].view(shape))
            update = F.linear(down, stack.b).mul_(plan.factors[index].view(shape))
        else:  # a LoRA bias or a training dropout: each adapter's own arithmetic on its rows
            update = sum(
                _adapter_update(x, *stack.parts[adapter], _rows_of(plan, index, adapter))
                for adapter in set(plan.adapters)
                if adapter in stack.spans
            )
        if update.dtype != result.dtype:
            update = update.to(result.dtype)
        return result.add_(update) if not result.requires_grad else result + update


def _transposed(cache: dict, index: int, b: torch.Tensor) -> torch.Tensor:
    """lora_B transposed, as the CPU kernel reads it (one row's update streams it along the outputs): made once,
    and again only when the weights were changed in place (peft's lora_B weights are views of the stack, so a
    change to either bumps the stack's version counter)."""
    try:
        version = b._version
    except RuntimeError:  # an inference tensor keeps no version: transposed afresh for every plan
        return b.t().contiguous()
    known = cache.get(index)
    if known is None or known[0] != version:
        known = (version, b.t().contiguous())
        cache[index] = known
    return known[1]


@dataclass(frozen=True)
class _Stack:
    """One LoRA layer's adapters: the base layer, each adapter's modules, and their weights stacked."""

    base: object  # the base layer (Linear4bit, Linear)
    parts: dict  # adapter position -> (lora_A, lora_B, dropout)
    spans: dict  # adapter position -> (start, rank, alpha / r) in the stacked weights
    a: torch.Tensor  # [sum of ranks, in]
    b: torch.Tensor  # [out, sum of ranks]
    exact: bool  # no LoRA bias and no training dropout: the stacked product is each adapter's own


def _stack(layer, adapter_names: list[str]) -> _Stack:
    """Stack the layer's adapters, making peft's lora_A / lora_B weights views of the stacked tensors."""
    parts, spans, a_list, b_list, start = {}, {}, [], [], 0
    for position, name in enumerate(adapter_names):
        if name not in layer.lora_A:
            continue
        lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
        parts[position] = (lora_A, lora_B, layer.lora_dropout[name])
        rank = lora_A.weight.shape[0]
        spans[position] = (start, rank, float(layer.scaling[name]))
        a_list.append(lora_A.weight)
        b_list.append(lora_B.weight)
        start += rank
    exact = all(
        a._parameters.get("bias") is None and b._parameters.get("bias") is None and not d.training
        for a, b, d in parts.values()
    )
    if len(a_list) == 1:
        a, b = a_list[0].detach(), b_list[0].detach()
    elif len({w.dtype for w in a_list + b_list}) > 1 or len({w.device for w in a_list + b_list}) > 1:
        a, b, exact = a_list[0].detach(), b_list[0].detach(), False
    else:
        with torch.no_grad():
            a = torch.cat([w.detach() for w in a_list], dim=0)
            b = torch.cat([w.detach() for w in b_list], dim=1)
        for (lora_A, lora_B, _), (begin, rank, _) in zip(parts.values(), spans.values(), strict=True):
            lora_A.weight = torch.nn.Parameter(a[begin : begin + rank], requires_grad=False)
            lora_B.weight = torch.nn.Parameter(b[:, begin : begin + rank], requires_grad=False)
    return _Stack(layer.base_layer, parts, spans, a, b, exact)


def _adapter_update(x, lora_A, lora_B, dropout, factors):
    """peft's own arithmetic (B(A(dropout(x))) * factor), with the modules' weights called directly: a decode
    step runs this in every LoRA layer, where module calls cost more than the math."""
    if x.dtype != lora_A.weight.dtype:
        x = x.to(lora_A.weight.dtype)
    if dropout.training:
        x = dropout(x)
    update = F.linear(F.linear(x, lora_A.weight, lora_A.bias), lora_B.weight, lora_B.bias)
    return update.mul_(factors.view(-1, *([1] * (x.dim() - 1))))


def _rows_of(plan, index: int, adapter: int):
    """The layer's per-row factors with every row of another adapter set to 0."""
    mask = torch.tensor([a == adapter for a in plan.adapters], dtype=plan.factors[index].dtype)
    return plan.factors[index] * mask.to(plan.factors[index].device)


def _mix_masks(stacks, dtype, spans, mixed, device) -> tuple:
    """Per layer where rows use different adapters, [rows, sum of ranks]: 1 on each row's adapter block, 0
    elsewhere (else None). One vectorised build for all such layers."""
    if not any(mixed):
        return (None,) * len(stacks)
    width = max(stack.a.shape[0] for stack in stacks)
    columns = torch.arange(width)
    start, rank = spans[..., 0:1], spans[..., 1:2]
    table = ((columns >= start) & (columns < start + rank)).to(dtype=dtype, device=device)
    return tuple(
        table[i, :, : stack.a.shape[0]].contiguous() if on else None
        for i, (stack, on) in enumerate(zip(stacks, mixed, strict=True))
    )


@dataclass(frozen=True)
class _Plan:
    rows: int  # batch rows the plan is for
    factors: tuple  # per layer, [rows] of strength x alpha / r in the LoRA weights' dtype and device
    spans: tuple  # per layer, [rows, 2] int64 (start, rank) of the row's adapter in the stack (0, 0: none)
    active: list[bool]  # per layer: does any row have a non-zero strength there
    single: list  # per layer: the one adapter position with non-zero rows there, None for none or several
    mix: tuple  # per layer with rows on several adapters: [rows, sum of ranks] block masks (see _mix_masks)
    fused: list  # per layer: (kernel call, stacked lora_A, stacked lora_B transposed) where the CPU kernel adds it
    adapters: tuple  # per row: the adapter position, or None for the base


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
def row_strengths(model, rows: list, adapters: Sequence[int | None] | None = None):
    """Run the model with these per-row strengths, of the adapter at each row's position in `adapters` (by
    default the primary; None = the base), holding the model's lock; restores peft after.

    Example: with row_strengths(model, [0, 1, 1], [None, 0, 1]): model.generate(...)  # base, primary, second
    """
    router = strength_router(model)
    if router is None:
        if any(_nonzero(s) for s in rows):
            raise InputError("No adapter is loaded (base-only): every strength must be 0.")
        yield
        return
    router.plan = router.plan_for(rows, adapters)
    try:
        yield
    finally:
        router.plan = None


def _nonzero(strength) -> bool:
    return (
        any(float(v) != 0 for v in strength) if isinstance(strength, (list, tuple)) else float(strength) != 0
    )
