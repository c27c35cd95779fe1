"""The merge check: how much of a LoRA update survives each way of baking it into the base, before shipping.

Against the model the adapter was trained and evaluated with, the 4-bit base plus the unmerged update
(W + ΔW, W = deQ of the 4-bit weight, ΔW = (alpha / r) · B A), each route (utils/runtime/merging.py: nf4,
bf16, fp16, fp32, original) gives a merged weight W'. Per adapted layer the share of the update lost is

    lost = ‖W' − W − ΔW‖_F / ‖ΔW‖_F

(0 = the update kept exactly; 1 = an error as large as the update itself), computed one layer at a time from
Backend.adapter_weights(). The behaviour of each merged copy comes from Backend.merged_runs: KL(unmerged ||
merged) and the log-probability change along texts, teacher-forced, and its greedy answers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from utils.core.seam import Backend, LoraWeights, MergedRuns

ROUTES = ("nf4", "bf16", "fp16", "fp32", "original")
ROUTE_LABELS = {
    "nf4": "merged into NF4, re-quantized (merge_and_unload on the 4-bit model)",
    "bf16": "merged into the de-quantized base, bf16",
    "fp16": "merged into the de-quantized base, fp16",
    "fp32": "merged into the de-quantized base, fp32",
    "original": "merged into the base's original full-precision weights",
}
_SHIPPABLE_LOSS = 0.05  # a route that loses more than 5% of the update in the median layer is called lossy


@dataclass(frozen=True)
class ModuleMerge:
    """One adapted layer: the update's norm and the share of it each route loses."""

    name: str
    layer: int
    module: str
    delta_fro: float
    lost: dict[str, float]  # route -> ‖W' − W − ΔW‖ / ‖ΔW‖


@dataclass
class MergeCheck:
    """The whole check for one adapter."""

    adapter: str
    modules: list[ModuleMerge]
    routes: list[str]  # the routes checked (original only where the base's weights are at hand)
    behaviour: dict[str, MergedRuns] = field(default_factory=dict)
    reference_texts: list[str] = field(default_factory=list)  # the unmerged adapter's greedy answers
    skipped: dict[str, str] = field(default_factory=dict)  # route -> why its copy was not run

    def median_lost(self, route: str) -> float:
        return statistics.median(m.lost[route] for m in self.modules) if self.modules else 0.0

    def worst_lost(self, route: str) -> float:
        return max((m.lost[route] for m in self.modules), default=0.0)

    def mean_kl(self, route: str) -> float | None:
        runs = self.behaviour.get(route)
        values = [k for row in runs.kl for k in row] if runs is not None else []
        return sum(values) / len(values) if values else None

    def mean_logprob_change(self, route: str) -> float | None:
        """The mean change of the written tokens' log-probability along the texts, merged minus unmerged."""
        runs = self.behaviour.get(route)
        values = [c for row in runs.logprob_change for c in row] if runs is not None else []
        return sum(values) / len(values) if values else None

    def same_answers(self, route: str) -> float | None:
        """The share of prompts whose merged greedy answer equals the unmerged adapter's."""
        runs = self.behaviour.get(route)
        if runs is None or not runs.texts:
            return None
        return sum(a == b for a, b in zip(runs.texts, self.reference_texts, strict=True)) / len(runs.texts)

    def verdict(self) -> str:
        """One line naming the safest route, and what merging into 4 bits would cost."""
        merged = [r for r in self.routes if r != "original"]
        if not merged:
            return "No merge route could be checked."
        best = min(merged, key=lambda r: (self.median_lost(r), self.mean_kl(r) or 0.0))
        line = (
            f"Safest merge for {self.adapter}: {best} ({ROUTE_LABELS[best]}), losing {_pct(self.median_lost(best))} "
            "of the update in the median layer"
        )
        kl = self.mean_kl(best)
        line += f", KL {kl:.2g} nats a token against the unmerged adapter." if kl is not None else "."
        lossy = [r for r in merged if self.median_lost(r) > _SHIPPABLE_LOSS]
        if lossy:
            line += " Lossy: " + ", ".join(f"{r} ({_pct(self.median_lost(r))})" for r in lossy) + "."
        if "original" in self.routes:
            line += (
                f" On the base's original weights (the usual deployment) the model differs from the one trained by "
                f"{_pct(self.median_lost('original'))} of the update: the 4-bit rounding the adapter learned on."
            )
        return line


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if x < 10 else f"{100 * x:,.0f}%"


def _layer_and_module(name: str) -> tuple[int, str]:
    parts = name.split(".")
    layer = next((int(p) for p in parts if p.isdigit()), -1)
    return layer, parts[-1]


def route_weight(route: str, base, delta, lw: LoraWeights):
    """W' of one layer by `route`, float32 values (see utils/runtime/merging.py for what each route is)."""
    import torch

    if route == "nf4":
        return lw.requantize(base + delta)
    if route in ("bf16", "fp16"):
        return (base + delta).to(torch.bfloat16 if route == "bf16" else torch.float16).float()
    if route == "fp32":
        return base + delta
    return lw.original_weight().float() + delta  # original


def survival(layers: Sequence[LoraWeights], routes: Sequence[str]) -> list[ModuleMerge]:
    """Per adapted layer, the share of the update each route loses, one layer's weights at a time."""
    out = []
    for lw in layers:
        base = lw.base_weight()
        delta = (lw.b.float() @ lw.a.float()) * lw.scaling  # peft's get_delta_weight, in its order
        norm = float(delta.norm())
        lost = {}
        for route in routes:
            residual = route_weight(route, base, delta, lw) - base - delta
            lost[route] = float(residual.norm()) / norm if norm > 0 else 0.0
        layer, module = _layer_and_module(lw.name)
        out.append(ModuleMerge(lw.name, layer, module, norm, lost))
    return out


def available_routes(layers: Sequence[LoraWeights]) -> tuple[list[str], dict[str, str]]:
    """(the routes these layers allow, why each other one is left out)."""
    routes, skipped = [], {}
    for route in ROUTES:
        if route == "nf4" and any(lw.requantize is None for lw in layers):
            skipped[route] = "the base is not held in 4 bits"
        elif route == "original" and any(lw.original_weight is None for lw in layers):
            skipped[route] = "the base's full-precision weights are not on this machine"
        else:
            routes.append(route)
    return routes, skipped


def check(
    backend: Backend,
    adapter: str,
    sequences: list[list[int]],
    keep_from: list[int],
    prompts: list[str],
    reference_texts: list[str],
    max_new_tokens: int,
    run_routes: Sequence[str] | None = None,
) -> MergeCheck:
    """The merge check of one adapter: the weights of every route, and the behaviour of `run_routes` (default:
    all available) along `sequences` and on `prompts` (whose unmerged answers are `reference_texts`)."""
    with backend.adapter_weights(adapter) as layers:
        routes, skipped = available_routes(layers)
        modules = survival(layers, routes)
    result = MergeCheck(adapter, modules, routes, reference_texts=list(reference_texts), skipped=skipped)
    chosen = [r for r in (run_routes if run_routes is not None else routes) if r in routes]
    if chosen:
        for route, runs in backend.merged_runs(
            adapter, chosen, sequences, keep_from, prompts, max_new_tokens
        ).items():
            if runs.refused:  # a copy that would not fit: the weights' figures still stand
                result.skipped[route] = runs.refused
            else:
                result.behaviour[route] = runs
    return result


def check_json(result: MergeCheck) -> dict:
    """The check as /merge_check returns it."""

    def finite(x):
        return x if x is None or math.isfinite(x) else None

    return {
        "adapter": result.adapter,
        "verdict": result.verdict(),
        "routes": [
            {
                "route": route,
                "label": ROUTE_LABELS[route],
                "median_lost": result.median_lost(route),
                "worst_lost": result.worst_lost(route),
                "mean_kl": finite(result.mean_kl(route)),
                "mean_logprob_change": finite(result.mean_logprob_change(route)),
                "same_answers": result.same_answers(route),
                "texts": result.behaviour[route].texts if route in result.behaviour else None,
            }
            for route in result.routes
        ],
        "skipped": result.skipped,
        "reference_texts": result.reference_texts,
        "modules": [
            {"layer": m.layer, "module": m.module, "delta_fro": m.delta_fro, "lost": m.lost}
            for m in result.modules
        ],
    }
