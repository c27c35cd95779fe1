"""The Adapters tab: every adapter the server loaded (checkpoints, variants) with its numbers; two of them
compared layer by layer (the cosine of their updates and the overlap of their top singular subspaces, from
r x r products); and a checkpoint series' growth (‖ΔW‖ and effective rank by step); plus /adapters,
/adapter_similarity and /checkpoint_growth."""

import gradio as gr

from ui.common import ON_MODEL, PRIVATE, TABLE, unchanged, user_errors
from ui.lens import Lens
from ui.views import adapters as adapter_views
from utils.analysis.similarity import TOP_K, growth
from utils.core.errors import InputError
from utils.core.inputs import parse_number, require_range

TOP_K_RANGE = (1, 64)


class AdaptersTab:
    def __init__(self, lens: Lens, anatomy_of):
        self.lens = lens
        self.anatomy_of = anatomy_of  # name -> Anatomy, cached by the Adapter anatomy tab

    @user_errors
    def adapters(self) -> dict:
        """The adapters this server loaded (its settings choose them; nothing a client sends loads one).

        Returns:
            adapters: {"adapters": [{"name", "primary", "source", "r", "alpha", "targets": [str], "parameters",
            "file_bytes", "footprint_bytes", "stored", "step"}], "left_out": [{"name", "reason"}]}. The primary
            adapter is also called "fine_tuned"; footprint_bytes is its weights in memory (fp32); stored is the
            file's dtype; step is the training step where the folder says (trainer_state.json, checkpoint-STEP).
        """
        return {
            "adapters": [dict(a) for a in self.lens.info.adapters],
            "left_out": list(getattr(self.lens.report, "left_out", []) or []),
        }

    @user_errors
    def adapter_similarity(self, a: str, b: str, top_k: int = TOP_K) -> dict:
        """Two loaded adapters compared layer by layer, without forming any ΔW.

        cos = <ΔW_a, ΔW_b>_F / (||ΔW_a|| ||ΔW_b||) from the r x r products B_aᵀB_b and A_a A_bᵀ; the overlap of
        the top-k left (output) and right (input) singular subspaces, ||U_aᵀ U_b||_F² / k, from thin QRs and
        r x r SVDs.
        Args:
            a: an adapter's name (see /adapters; "fine_tuned" is the primary)
            b: another adapter's name
            top_k: singular directions compared, 1-64 (fewer where an adapter's rank is lower)
        Returns:
            similarity: {"a", "b", "cosine" (over all shared layers), "by_module_type": {module: {"cosine",
            "overlap_out", "overlap_in"}}, "modules": [{"layer", "module", "norm_a", "norm_b", "cosine",
            "overlap_out", "overlap_in", "k"}], "only_a": [layer name], "only_b": [...]}
        """
        return adapter_views.similarity_json(self._similarity(a, b, top_k))

    def _similarity(self, a, b, top_k):
        k = parse_number("top_k", top_k, integer=True)
        require_range("top_k", k, TOP_K_RANGE)
        for name, which in ((a, "a"), (b, "b")):
            if not isinstance(name, str) or not name.strip():
                raise InputError(f"{which} must name a loaded adapter (see /adapters).")
        if self.lens.backend.adapter_named(a)["name"] == self.lens.backend.adapter_named(b)["name"]:
            raise InputError("a and b are the same adapter; choose two different ones.")
        return self.lens.similarity(a, b, int(k))

    @user_errors
    def checkpoint_growth(self) -> list:
        """How a checkpoint series grows: per module type, ||ΔW||_F (over all its layers) and the mean effective
        rank (90% energy) at each loaded adapter whose training step is known, by step.

        Returns:
            growth: [{"adapter", "step", "module", "delta_fro", "effective_rank_90"}, ...] by step
        """
        return adapter_views.growth_json(self._growth())

    def _growth(self):
        series = [a for a in self.lens.info.adapters if a.get("step") is not None]
        if len(series) < 2:
            raise InputError(
                "A checkpoint series needs at least two loaded adapters with a known training step "
                "(checkpoint-STEP folders or trainer_state.json)."
            )
        return growth([(a["name"], a["step"], self.anatomy_of(a["name"])) for a in series])

    @user_errors
    def ui_similarity(self, a, b):
        try:
            sim = self._similarity(a, b, TOP_K)
        except InputError as exc:
            return unchanged(exc, 3)
        return (
            adapter_views.similarity_sentence(sim),
            adapter_views.similarity_figure(sim),
            adapter_views.similarity_frame(sim),
        )

    @user_errors
    def ui_growth(self):
        try:
            points = self._growth()
        except InputError as exc:
            return unchanged(exc, 1)
        return adapter_views.growth_figure(points)


def layout(tab: AdaptersTab) -> None:
    lens = tab.lens
    names = [a["name"] for a in lens.info.adapters]
    gr.Markdown(
        "Every adapter this server holds on the one base: the primary (the **fine_tuned** pane elsewhere) and "
        "the others `LORA_LENS_ADAPTERS` lists, such as a fine-tune's checkpoints. The Strength sweep tab runs "
        "any of them side by side in one batch; Evaluate scores them; Adapter anatomy dissects each."
    )
    gr.Dataframe(
        adapter_views.adapters_frame(lens.info.adapters),
        label="Loaded adapters",
        interactive=False,
        wrap=True,
        elem_id="lens-adapters-table",
    )
    left_out = getattr(lens.report, "left_out", []) or []
    if left_out:
        gr.Markdown("\n".join(f"- **{x['name']}** left out: {x['reason']}" for x in left_out))
    if len(names) < 2:
        gr.Markdown("Load more adapters (`LORA_LENS_ADAPTERS`) to compare them with each other.")
        return
    gr.Markdown("### Two adapters, layer by layer")
    with gr.Row():
        a = gr.Dropdown(names, value=names[-1], label="Adapter a", elem_id="lens-sim-a")
        b = gr.Dropdown(
            names,
            value=names[1] if names[0] == names[-1] else names[0],
            label="Adapter b",
            elem_id="lens-sim-b",
        )
        run = gr.Button("Compare the updates", variant="primary", elem_id="lens-sim-run")
    sentence = gr.Markdown(elem_id="lens-sim-summary")
    figure = gr.Plot(show_label=False, elem_id="lens-sim-heatmaps")
    table = gr.Dataframe(
        label="Per module type", interactive=False, elem_id="lens-sim-table", elem_classes=TABLE
    )
    run.click(tab.ui_similarity, inputs=[a, b], outputs=[sentence, figure, table], **ON_MODEL, **PRIVATE)
    if sum(1 for x in lens.info.adapters if x.get("step") is not None) >= 2:
        gr.Markdown("### The checkpoint series: how the update grows with training")
        grow = gr.Button("Show the growth", elem_id="lens-growth-run")
        chart = gr.Plot(show_label=False, elem_id="lens-growth-chart")
        grow.click(tab.ui_growth, outputs=[chart], **ON_MODEL, **PRIVATE)
