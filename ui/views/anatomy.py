"""The Adapter anatomy tab's views: the layers x modules heatmap, a module's singular values, the rank table
and summary, and the /anatomy JSON."""

from __future__ import annotations

from utils.analysis.anatomy import ENERGY, Anatomy, ModuleAnatomy


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


def heatmap_figure(anatomy: Anatomy, relative: bool = False):
    """Layers x target modules, coloured by ||ΔW||_F (or ||ΔW||_F / ||W||_F): where the change lives."""
    cells = [(m.layer, m.module, m.relative if relative else m.delta_fro) for m in anatomy.modules]
    return layer_module_figure(
        cells,
        "||ΔW||_F / ||W||_F" if relative else "||ΔW||_F",
        "Relative size of the update" if relative else "Size of the update ΔW = (alpha/r)·B A",
    )


def layer_module_figure(cells, colour_label: str, title: str, cmap: str = "viridis"):
    """A heatmap of (decoder layer, module, value) cells: layers down, modules across in the order they come."""
    from matplotlib.figure import Figure

    layers = sorted({layer for layer, _, _ in cells})
    modules = list(dict.fromkeys(module for _, module, _ in cells))
    grid = [[float("nan")] * len(modules) for _ in layers]
    for layer, module, value in cells:
        grid[layers.index(layer)][modules.index(module)] = value
    figure = Figure(figsize=(2.2 + 1.1 * len(modules), 1.2 + 0.22 * len(layers)), layout="constrained")
    axis = figure.subplots()
    image = axis.imshow(grid, aspect="auto", cmap=cmap, interpolation="nearest")
    axis.set_xticks(range(len(modules)), modules)
    axis.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
    axis.set_ylabel("decoder layer")
    figure.colorbar(image, ax=axis, label=colour_label)
    axis.set_title(title)
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
