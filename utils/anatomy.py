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

import torch

from utils.errors import InputError

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


def base_weight(layer) -> torch.Tensor:
    """The layer's base weight in float32, de-quantized when it is held in 4 bits (this layer only)."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else getattr(layer, "base_layer", layer)
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        if getattr(quant_state, "packing_format_for_cpu", False):
            return _dequantize_cpu_packed(weight.data, quant_state)
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).float()
    return weight.detach().float()


def _dequantize_cpu_packed(packed: torch.Tensor, quant_state, block_n: int = 32) -> torch.Tensor:
    """A weight that bitsandbytes repacked for its AVX512-BF16 CPU kernel (on its first forward pass), read
    without changing it: nibbles in blocks of 32 output rows ([N, K/2], low nibbles the first 32 of every 64
    values), scales as [K / blocksize, N] in bf16. The values are the ones that kernel multiplies by."""
    n, k = quant_state.shape
    pairs = packed.view(torch.uint8).reshape(-1, block_n)
    codes = torch.cat([pairs & 0xF, pairs >> 4], dim=-1)  # [.., 64]: 32 low nibbles, then 32 high
    codes = codes.reshape(n // block_n, k // 2, block_n, 2).transpose(1, 2).reshape(n, k).long()
    values = quant_state.code.float()[codes]
    scales = quant_state.absmax.float().T.repeat_interleave(quant_state.blocksize, dim=1)
    return values * scales


def compute_anatomy(router, r: int, alpha: float) -> Anatomy:
    """The anatomy of every layer the engine's strength router scales (the caller holds the model's lock)."""
    modules = []
    with torch.inference_mode():
        for name, layer, scaling in zip(router.names, router.layers, router.scalings, strict=True):
            a = layer.lora_A[router.adapter_name].weight.detach()
            b = layer.lora_B[router.adapter_name].weight.detach()
            sv = delta_singular_values(a, b, scaling)
            values = sv.tolist()
            delta = math.sqrt(sum(s * s for s in values))
            index, module = parse_module_name(name)
            modules.append(
                ModuleAnatomy(
                    name=name,
                    layer=index,
                    module=module,
                    delta_fro=delta,
                    base_fro=float(torch.linalg.vector_norm(base_weight(layer).double())),
                    singular_values=values,
                    effective_rank_90=effective_rank(values),
                    stable_rank=stable_rank(values),
                )
            )
    return Anatomy(r=r, alpha=float(alpha), modules=modules)


def anatomy_json(anatomy: Anatomy) -> dict:
    return {
        "r": anatomy.r,
        "alpha": anatomy.alpha,
        "modules": [
            {
                "layer": m.layer,
                "module": m.module,
                "delta_fro": m.delta_fro,
                "base_fro": m.base_fro,
                "relative": m.relative,
                "singular_values": m.singular_values,
                "effective_rank_90": m.effective_rank_90,
                "stable_rank": m.stable_rank,
            }
            for m in anatomy.modules
        ],
    }


# ---------------------------------------------------------------------------------------------------
# Ablation: which layers and modules to switch off


def parse_layers(text, n_layers: int) -> list[int]:
    """Layer indices from "0-4,10" (ranges inclusive, commas or spaces), each within the model.

    Example: parse_layers("0-2, 5", 30) -> [0, 1, 2, 5]
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError(f'layers must be text such as "0-4,10" (layers 0 to {n_layers - 1}).')
    out: list[int] = []
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        bounds = part.split("-")
        if len(bounds) > 2 or not all(b.strip().isdigit() for b in bounds):
            raise InputError(f'"{part[:20]}" is not a layer or a range such as 0-4.')
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


# ---------------------------------------------------------------------------------------------------
# Views (pure: matplotlib Figures, pandas frames, markdown)


def heatmap_figure(anatomy: Anatomy, relative: bool = False):
    """Layers x target modules, coloured by ||ΔW||_F (or ||ΔW||_F / ||W||_F): where the change lives."""
    from matplotlib.figure import Figure

    layers, modules = anatomy.layers(), anatomy.module_names()
    grid = [[float("nan")] * len(modules) for _ in layers]
    for m in anatomy.modules:
        grid[layers.index(m.layer)][modules.index(m.module)] = m.relative if relative else m.delta_fro
    figure = Figure(figsize=(2.2 + 1.1 * len(modules), 1.2 + 0.22 * len(layers)), layout="constrained")
    axis = figure.subplots()
    image = axis.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    axis.set_xticks(range(len(modules)), modules)
    axis.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
    axis.set_ylabel("decoder layer")
    figure.colorbar(image, ax=axis, label="||ΔW||_F / ||W||_F" if relative else "||ΔW||_F")
    axis.set_title("Relative size of the update" if relative else "Size of the update ΔW = (alpha/r)·B A")
    return figure


def singular_values_figure(module: ModuleAnatomy, r: int):
    """The singular values of one ΔW and their cumulative energy, with the effective rank marked."""
    from matplotlib.figure import Figure

    values = module.singular_values
    total = sum(s * s for s in values) or 1.0
    cumulative, running = [], 0.0
    for s in values:
        running += s * s
        cumulative.append(running / total)
    figure = Figure(figsize=(7.5, 3.6), layout="constrained")
    axis = figure.subplots()
    ks = range(1, len(values) + 1)
    axis.bar(ks, values, color="#4f46e5", label="singular value")
    axis.set_xlabel(f"dimension (of r = {r})")
    axis.set_ylabel("singular value of ΔW")
    energy = axis.twinx()
    energy.plot(ks, [100 * c for c in cumulative], color="#d97706", marker=".", label="cumulative energy")
    energy.axhline(100 * ENERGY, color="#d97706", linestyle=":", linewidth=1)
    energy.set_ylim(0, 102)
    energy.set_ylabel("cumulative energy (%)")
    axis.axvline(module.effective_rank_90 + 0.5, color="0.4", linestyle="--", linewidth=1)
    axis.set_title(
        f"Layer {module.layer} {module.module}: effective rank {module.effective_rank_90} (90% energy), "
        f"stable rank {module.stable_rank:.2f}"
    )
    return figure


def rank_frame(anatomy: Anatomy):
    """One row per module type: mean and range of the effective rank, mean stable rank and update sizes."""
    import pandas as pd

    rows = []
    for name in anatomy.module_names():
        ms = [m for m in anatomy.modules if m.module == name]
        ranks = [m.effective_rank_90 for m in ms]
        rows.append(
            {
                "module": name,
                "layers": len(ms),
                "effective rank (90%), mean": round(sum(ranks) / len(ranks), 2),
                "min–max": f"{min(ranks)}–{max(ranks)}",
                "stable rank, mean": round(sum(m.stable_rank for m in ms) / len(ms), 2),
                "||ΔW||_F, mean": round(sum(m.delta_fro for m in ms) / len(ms), 4),
                "||ΔW||/||W||, mean": round(sum(m.relative for m in ms) / len(ms), 5),
            }
        )
    return pd.DataFrame(rows)


def rank_sentence(anatomy: Anatomy) -> str:
    """Example: "r = 32 was set; the update holds 90% of its energy in 7.4 dimensions on average ..." """
    ranks = [m.effective_rank_90 for m in anatomy.modules]
    mean = sum(ranks) / len(ranks)
    largest = max(anatomy.modules, key=lambda m: m.relative)
    return (
        f"r = {anatomy.r} was set; the update holds 90% of its energy in **{mean:.1f} dimensions on average** "
        f"(from {min(ranks)} to {max(ranks)} across {len(ranks)} modules). The largest change relative to the "
        f"base weight is in layer {largest.layer} {largest.module} (||ΔW|| / ||W|| = {largest.relative:.4f})."
    )
