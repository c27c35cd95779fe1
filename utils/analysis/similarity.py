"""Across adapters: how alike two adapters' updates are, layer by layer, and how a checkpoint series grows.

For ΔW_i = s_i · B_i A_i (B: out x r, A: r x in) nothing of size out x in is formed:
- ⟨ΔW_1, ΔW_2⟩_F = s_1 s_2 · tr(A_1ᵀ B_1ᵀ B_2 A_2) = s_1 s_2 · Σ (B_1ᵀ B_2) ⊙ (A_1 A_2ᵀ), two r_1 x r_2
  products; ‖ΔW‖_F² the same with itself; the cosine is their ratio.
- The singular vectors come from thin QRs and an r x r SVD (B = Q_B R_B, Aᵀ = Q_A R_A, R_B R_Aᵀ = U S Vᵀ:
  ΔW's left vectors are Q_B U, its right ones Q_A V), so the overlap of two top-k subspaces,
  ‖U_1ᵀ U_2‖_F² / k (1: the same directions, 0: orthogonal), needs out x r and in x r matrices only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from utils.analysis.anatomy import Anatomy, parse_module_name
from utils.core.errors import InputError
from utils.core.seam import LoraWeights

TOP_K = 8  # singular directions compared by the subspace overlap (fewer where an adapter's rank is lower)


@dataclass(frozen=True)
class ModuleSimilarity:
    """One linear layer both adapters adapt."""

    name: str
    layer: int
    module: str
    norm_a: float  # ‖ΔW_a‖_F
    norm_b: float
    cosine: float  # ⟨ΔW_a, ΔW_b⟩_F / (‖ΔW_a‖ ‖ΔW_b‖); nan where either is 0
    overlap_out: float  # of the top-k left singular subspaces (output side)
    overlap_in: float  # of the top-k right singular subspaces (input side)
    k: int  # directions compared


@dataclass(frozen=True)
class Similarity:
    a: str
    b: str
    modules: list[ModuleSimilarity]  # layers both adapt, in the model's order
    only_a: list[str]  # layers only a adapts
    only_b: list[str]

    def by_module_type(self) -> dict[str, dict[str, float]]:
        """Mean cosine and overlaps per module type (q_proj, ...)."""
        out: dict[str, dict[str, float]] = {}
        for kind in dict.fromkeys(m.module for m in self.modules):
            group = [m for m in self.modules if m.module == kind]
            out[kind] = {
                key: _mean(getattr(m, key) for m in group) for key in ("cosine", "overlap_out", "overlap_in")
            }
        return out

    def overall_cosine(self) -> float:
        """⟨ΔW_a, ΔW_b⟩ / (‖ΔW_a‖ ‖ΔW_b‖) over all shared layers at once (each layer weighted by its norms)."""
        dot = sum(m.cosine * m.norm_a * m.norm_b for m in self.modules if not math.isnan(m.cosine))
        norm_a = math.sqrt(sum(m.norm_a**2 for m in self.modules))
        norm_b = math.sqrt(sum(m.norm_b**2 for m in self.modules))
        return dot / (norm_a * norm_b) if norm_a and norm_b else float("nan")


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def _factors(layer: LoraWeights):
    """(left vectors out x r, singular values, right vectors in x r) of scaling · B A, in float64."""
    import torch

    q_b, r_b = torch.linalg.qr(layer.b.double())
    q_a, r_a = torch.linalg.qr(layer.a.double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return q_b @ u, s * abs(layer.scaling), q_a @ vh.T


def module_similarity(a: LoraWeights, b: LoraWeights, top_k: int = TOP_K) -> ModuleSimilarity:
    """Cosine and subspace overlaps of two adapters' updates of one layer (see the module docstring)."""
    import torch

    with torch.inference_mode():
        a_a, b_a, a_b, b_b = a.a.double(), a.b.double(), b.a.double(), b.b.double()
        inner = a.scaling * b.scaling * float(((b_a.T @ b_b) * (a_a @ a_b.T)).sum())
        norm_a = abs(a.scaling) * math.sqrt(max(float(((b_a.T @ b_a) * (a_a @ a_a.T)).sum()), 0.0))
        norm_b = abs(b.scaling) * math.sqrt(max(float(((b_b.T @ b_b) * (a_b @ a_b.T)).sum()), 0.0))
        cosine = inner / (norm_a * norm_b) if norm_a and norm_b else float("nan")
        u_a, s_a, v_a = _factors(a)
        u_b, s_b, v_b = _factors(b)
        k = min(top_k, int((s_a > 0).sum()), int((s_b > 0).sum()))
        if k:
            overlap_out = float((u_a[:, :k].T @ u_b[:, :k]).square().sum()) / k
            overlap_in = float((v_a[:, :k].T @ v_b[:, :k]).square().sum()) / k
        else:
            overlap_out = overlap_in = float("nan")
    layer, module = parse_module_name(a.name)
    return ModuleSimilarity(a.name, layer, module, norm_a, norm_b, cosine, overlap_out, overlap_in, k)


def similarity(
    name_a: str,
    layers_a: Sequence[LoraWeights],
    name_b: str,
    layers_b: Sequence[LoraWeights],
    top_k: int = TOP_K,
) -> Similarity:
    """Every layer both adapters adapt, compared; the layers only one adapts listed."""
    by_name = {layer.name: layer for layer in layers_b}
    shared = [layer for layer in layers_a if layer.name in by_name]
    if not shared:
        raise InputError(f"{name_a} and {name_b} adapt no layer in common: there is nothing to compare.")
    return Similarity(
        name_a,
        name_b,
        [module_similarity(layer, by_name[layer.name], top_k) for layer in shared],
        [layer.name for layer in layers_a if layer.name not in by_name],
        [name for name in by_name if name not in {layer.name for layer in layers_a}],
    )


@dataclass(frozen=True)
class GrowthPoint:
    """One checkpoint of a series, per module type: the size of its update and the dimensions it uses."""

    adapter: str
    step: int
    module: str
    delta_fro: float  # ‖ΔW‖_F over all layers of this module type (root of the sum of squares)
    effective_rank_90: float  # mean over those layers


def growth(series: Sequence[tuple[str, int, Anatomy]]) -> list[GrowthPoint]:
    """(adapter, step, anatomy) of each checkpoint -> per module type, ‖ΔW‖ and effective rank by step."""
    points = []
    for adapter, step, anatomy in sorted(series, key=lambda entry: entry[1]):
        for kind in anatomy.module_names():
            group = [m for m in anatomy.modules if m.module == kind]
            points.append(
                GrowthPoint(
                    adapter,
                    step,
                    kind,
                    math.sqrt(sum(m.delta_fro**2 for m in group)),
                    sum(m.effective_rank_90 for m in group) / len(group),
                )
            )
    return points
