"""Adapter anatomy: where the LoRA update lives, how many of its r dimensions it uses, and what each part does.

For every adapted layer the update is ΔW = (alpha / r) · B A (B: out x r, A: r x in). Its singular values
come without forming ΔW: with B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), ΔW = (alpha / r) · Q_B (R_B R_Aᵀ) Q_Aᵀ,
so they are those of the r x r core R_B R_Aᵀ. The base weight's norm is taken one layer at a time (4-bit
weights de-quantized for that layer only), never the whole model at once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from utils.core.errors import InputError
from utils.core.seam import LoraWeights

if TYPE_CHECKING:
    import torch

ALL_LAYERS = "all"  # the ablation's default: every decoder layer of the loaded model
ENERGY = 0.90  # the effective rank holds this share of the update's energy (sum of squared singular values)
_LAYER = re.compile(r"layers\.(\d+)\.(?:.*\.)?([A-Za-z0-9_]+)$")


@dataclass(frozen=True)
class ModuleAnatomy:
    """One adapted linear layer."""

    name: str  # the module's qualified name in the model
    layer: int  # decoder layer index
    module: str  # q_proj, k_proj, ...
    delta_fro: float  # ||ΔW||_F
    base_fro: float  # ||W||_F of the base weight (de-quantized)
    singular_values: list[float]  # of ΔW, descending, r of them
    effective_rank_90: int  # dimensions holding ENERGY of the update's energy
    stable_rank: float  # ||ΔW||_F² / σ_max²

    @property
    def relative(self) -> float:
        return self.delta_fro / self.base_fro if self.base_fro else float("nan")


@dataclass(frozen=True)
class Anatomy:
    r: int
    alpha: float
    modules: list[ModuleAnatomy]  # in the router's (model) order

    def layers(self) -> list[int]:
        return sorted({m.layer for m in self.modules})

    def module_names(self) -> list[str]:
        return list(dict.fromkeys(m.module for m in self.modules))

    def find(self, layer: int, module: str) -> ModuleAnatomy:
        for m in self.modules:
            if m.layer == layer and m.module == module:
                return m
        raise InputError(f"No adapted module {module} in layer {layer}.")


def parse_module_name(name: str) -> tuple[int, str]:
    """(layer index, module) from a qualified name. Example: "...layers.3.self_attn.q_proj" -> (3, "q_proj")"""
    match = _LAYER.search(name)
    if not match:
        raise InputError(f"Cannot tell the layer of module {name}.")
    return int(match.group(1)), match.group(2)


def delta_singular_values(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Singular values of scaling · B A (descending) from two thin QRs and an r x r SVD, in float64.

    Example: for B = u vᵀ-like rank-1 factors, only the first value is non-zero.
    """
    import torch

    _, r_b = torch.linalg.qr(b.double())  # B = Q_B R_B, R_B: r x r
    _, r_a = torch.linalg.qr(a.double().T)  # Aᵀ = Q_A R_A, R_A: r x r
    return torch.linalg.svdvals(r_b @ r_a.T) * abs(scaling)


def effective_rank(singular_values: Sequence[float], energy: float = ENERGY) -> int:
    """Fewest dimensions holding `energy` of sum σ². Example: effective_rank([3, 1, 0]) -> 1 (9 / 10 = 90%)"""
    squares = [s * s for s in singular_values]
    total = sum(squares)
    if total == 0:
        return 0
    running = 0.0
    for k, sq in enumerate(squares, start=1):
        running += sq
        if running >= energy * total * (1 - 1e-12):
            return k
    return len(squares)


def stable_rank(singular_values: Sequence[float]) -> float:
    """||ΔW||_F² / σ_max². Example: stable_rank([2, 2]) -> 2.0"""
    top = max(singular_values, default=0.0)
    return sum(s * s for s in singular_values) / (top * top) if top else 0.0


def compute_anatomy(layers: Sequence[LoraWeights], r: int, alpha: float) -> Anatomy:
    """The anatomy of every adapted layer (from Backend.adapter_weights(), which holds the model meanwhile)."""
    import torch

    modules = []
    with torch.inference_mode():
        for layer in layers:
            sv = delta_singular_values(layer.a, layer.b, layer.scaling)
            values = sv.tolist()
            delta = math.sqrt(sum(s * s for s in values))
            index, module = parse_module_name(layer.name)
            modules.append(
                ModuleAnatomy(
                    name=layer.name,
                    layer=index,
                    module=module,
                    delta_fro=delta,
                    base_fro=float(torch.linalg.vector_norm(layer.base_weight().double())),
                    singular_values=values,
                    effective_rank_90=effective_rank(values),
                    stable_rank=stable_rank(values),
                )
            )
    return Anatomy(r=r, alpha=float(alpha), modules=modules)


# ---------------------------------------------------------------------------------------------------
# Ablation: which layers and modules to switch off


def parse_layers(text, n_layers: int) -> list[int]:
    """Layer indices from "0-4,10" (ranges inclusive, commas or spaces), each within the model; "all" for
    every layer.

    Example: parse_layers("0-2, 5", 30) -> [0, 1, 2, 5]; parse_layers("all", 3) -> [0, 1, 2]
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError(f'layers must be text such as "0-4,10" or "all" (layers 0 to {n_layers - 1}).')
    if text.strip().lower() == ALL_LAYERS:
        return list(range(n_layers))
    out: list[int] = []
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        bounds = part.split("-")
        if len(bounds) > 2 or not all(b.strip().isdigit() for b in bounds):
            raise InputError(
                f'"{part[:20]}" is not a layer or a range such as 0-4 (this model has layers 0 to {n_layers - 1}).'
            )
        low, high = int(bounds[0]), int(bounds[-1])
        if low > high:
            raise InputError(f"The range {part} runs backwards; write {high}-{low}.")
        if high >= n_layers:
            raise InputError(f"Layer {high} does not exist: this model has layers 0 to {n_layers - 1}.")
        out += [i for i in range(low, high + 1) if i not in out]
    if not out:
        raise InputError(f"layers must name at least one layer (0 to {n_layers - 1}).")
    return out


def parse_modules(text, known: Sequence[str]) -> list[str]:
    """Module names from "q_proj,v_proj", each one the adapter targets. Example: "q_proj v_proj" -> both"""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"modules must name at least one of: {', '.join(known)}.")
    names = [p for p in text.replace(",", " ").split() if p]
    unknown = [n for n in names if n not in known]
    if unknown:
        shown = ", ".join(n[:30] for n in unknown[:3])
        raise InputError(f"Unknown module(s) {shown}: the adapter targets {', '.join(known)}.")
    return list(dict.fromkeys(names))


def ablation_strengths(
    names: Sequence[str], layers: Sequence[int], modules: Sequence[str]
) -> tuple[float, ...]:
    """Per-LoRA-layer strengths (router order): 0 on the chosen layers x modules, 1 everywhere else."""
    off = set(layers)
    chosen = set(modules)
    out = []
    for name in names:
        layer, module = parse_module_name(name)
        out.append(0.0 if layer in off and module in chosen else 1.0)
    return tuple(out)


def layer_blocks(n_layers: int, size: int = 5) -> list[tuple[int, int]]:
    """Consecutive blocks of `size` layers. Example: layer_blocks(12, 5) -> [(0, 4), (5, 9), (10, 11)]"""
    return [(start, min(start + size, n_layers) - 1) for start in range(0, n_layers, size)]
