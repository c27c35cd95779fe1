"""The Adapters tab's views: the loaded adapters' table, two adapters compared layer by layer (heatmaps of
the cosine and the subspace overlap, a table per module type), a checkpoint series' growth, and their JSON."""

from __future__ import annotations

import math

from ui.views.header import format_size
from utils.analysis.similarity import GrowthPoint, Similarity


def adapters_frame(adapters) -> object:
    """One row per loaded adapter (BackendInfo.adapters)."""
    import pandas as pd

    rows = [
        {
            "name": a["name"] + (" (primary: fine_tuned)" if a.get("primary") else ""),
            "step": a.get("step"),
            "r": a.get("r"),
            "alpha": a.get("alpha"),
            "targets": ", ".join(a.get("targets") or []),
            "parameters": f"{a.get('parameters', 0):,}",
            "file": format_size(a.get("file_bytes", 0)) + (f" ({a['stored']})" if a.get("stored") else ""),
            "in memory": format_size(a.get("footprint_bytes", 0)),
            "source": a.get("source", ""),
        }
        for a in adapters
    ]
    return pd.DataFrame(rows)


def similarity_json(sim: Similarity) -> dict:
    def number(value):
        return None if value is None or math.isnan(value) else value

    return {
        "a": sim.a,
        "b": sim.b,
        "cosine": number(sim.overall_cosine()),
        "by_module_type": {
            kind: {key: number(v) for key, v in values.items()}
            for kind, values in sim.by_module_type().items()
        },
        "modules": [
            {
                "layer": m.layer,
                "module": m.module,
                "norm_a": m.norm_a,
                "norm_b": m.norm_b,
                "cosine": number(m.cosine),
                "overlap_out": number(m.overlap_out),
                "overlap_in": number(m.overlap_in),
                "k": m.k,
            }
            for m in sim.modules
        ],
        "only_a": sim.only_a,
        "only_b": sim.only_b,
    }


def similarity_figure(sim: Similarity):
    """Two heatmaps, layers x modules: the cosine of the two updates, and the overlap of their top subspaces."""
    from matplotlib.figure import Figure

    layers = sorted({m.layer for m in sim.modules})
    modules = list(dict.fromkeys(m.module for m in sim.modules))
    figure = Figure(figsize=(3.0 + 2.2 * len(modules), 1.4 + 0.22 * len(layers)), layout="constrained")
    axes = figure.subplots(1, 2)
    for axis, key, title, limits, cmap in (
        (axes[0], "cosine", f"cos(ΔW {sim.a}, ΔW {sim.b})", (-1, 1), "RdBu"),
        (axes[1], "overlap_out", "overlap of the top output directions", (0, 1), "viridis"),
    ):
        grid = [[float("nan")] * len(modules) for _ in layers]
        for m in sim.modules:
            grid[layers.index(m.layer)][modules.index(m.module)] = getattr(m, key)
        image = axis.imshow(
            grid, aspect="auto", cmap=cmap, vmin=limits[0], vmax=limits[1], interpolation="nearest"
        )
        axis.set_xticks(range(len(modules)), modules, fontsize=8)
        axis.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
        axis.set_ylabel("decoder layer")
        axis.set_title(title, fontsize=9)
        figure.colorbar(image, ax=axis)
    return figure


def similarity_frame(sim: Similarity):
    import pandas as pd

    rows = [
        {
            "module": kind,
            "cosine, mean": _round(values["cosine"]),
            "overlap of top output directions, mean": _round(values["overlap_out"]),
            "overlap of top input directions, mean": _round(values["overlap_in"]),
        }
        for kind, values in sim.by_module_type().items()
    ]
    return pd.DataFrame(rows)


def similarity_sentence(sim: Similarity) -> str:
    k = max((m.k for m in sim.modules), default=0)
    only = ""
    if sim.only_a or sim.only_b:
        only = f" {len(sim.only_a)} layer(s) only {sim.a} adapts and {len(sim.only_b)} only {sim.b} adapts are left out."
    return (
        f"Over the {len(sim.modules)} layers both adapt, cos(ΔW_{sim.a}, ΔW_{sim.b}) = "
        f"**{_round(sim.overall_cosine())}** (1: the same update up to its size, 0: unrelated, -1: opposite); "
        f"the overlap compares each update's top {k} singular directions (1: the same subspace).{only}"
    )


def _round(value: float | None, places: int = 3):
    return None if value is None or math.isnan(value) else round(value, places)


def growth_json(points: list[GrowthPoint]) -> list[dict]:
    return [
        {
            "adapter": p.adapter,
            "step": p.step,
            "module": p.module,
            "delta_fro": p.delta_fro,
            "effective_rank_90": p.effective_rank_90,
        }
        for p in points
    ]


def growth_figure(points: list[GrowthPoint]):
    """‖ΔW‖_F and the mean effective rank against the training step, a line per module type."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.8), layout="constrained")
    size_axis, rank_axis = figure.subplots(1, 2)
    for kind in dict.fromkeys(p.module for p in points):
        line = [p for p in points if p.module == kind]
        steps = [p.step for p in line]
        size_axis.plot(steps, [p.delta_fro for p in line], marker="o", label=kind)
        rank_axis.plot(steps, [p.effective_rank_90 for p in line], marker="o", label=kind)
    size_axis.set_xlabel("training step")
    size_axis.set_ylabel("||ΔW||_F over all layers")
    size_axis.set_title("How large the update grows")
    rank_axis.set_xlabel("training step")
    rank_axis.set_ylabel("effective rank (90% energy), mean")
    rank_axis.set_title("How many dimensions it uses")
    for axis in (size_axis, rank_axis):
        axis.grid(True, alpha=0.2)
        axis.legend(fontsize=8)
    return figure
