"""The Ship tab: what merging an adapter into the base does to it, route by route (into NF4 and re-quantized,
into the de-quantized base in bf16 / fp16 / fp32, into the base's original weights), before it ships; and the
exports engines load (the adapter at a strength as a peft folder, a GGUF LoRA for llama.cpp, a reference file
of greedy texts and log-probabilities); plus /merge_check and /export."""

import inspect
import tempfile
import time
from pathlib import Path

import gradio as gr

from ui.common import ON_MODEL, PRIVATE, TABLE, unchanged, user_errors
from ui.durations import ANATOMY_S
from ui.gpu import on_gpu
from ui.lens import Lens
from ui.views import ship as ship_views
from utils.analysis.merge_check import ROUTES
from utils.core.errors import InputError
from utils.core.gpu_budget import Work
from utils.core.inputs import check_strength, clean_prompt, parse_number
from utils.core.seam import FINE_TUNED
from utils.task import ship

EXPORTS = {
    "adapter": "The adapter at strength s (peft folder, zipped)",
    "gguf": "GGUF LoRA for llama.cpp (f32)",
    "reference": "Reference file: greedy texts and log p, base and fine-tune (JSON)",
}
CHECK_ITEMS = 20


class ShipEndpoints:
    """/merge_check and /export over one Lens."""

    def __init__(self, lens: Lens):
        self.lens = lens
        self._gpu_check = on_gpu(self._check_duration, "the merge check")(self._check_body)
        self._gpu_reference = on_gpu(self._reference_duration, "the reference file")(self._reference_body)

    def default_prompt(self) -> str:
        return ship.default_prompt(self.lens.profile)

    def _check_duration(self, adapter, prompt, n_items) -> int:
        rows = (n_items + 1) * (1 + len(ROUTES))  # every prompt under the unmerged adapter and each copy
        work = Work(prefill_tokens=64 * rows, steps=ship.TEXT_TOKENS * (2 + len(ROUTES)))
        return self.lens.durations._reserve("merge check", work, ANATOMY_S * len(ROUTES))

    def _check_body(self, adapter, prompt, n_items):
        return ship.run_check(self.lens.backend, self.lens.profile, adapter, prompt, n_items)

    def _reference_duration(self, n_items) -> int:
        work = Work(prefill_tokens=2 * 64 * n_items, steps=ship.TEXT_TOKENS * n_items)
        return self.lens.durations._reserve("reference file", work)

    def _reference_body(self, n_items):
        out = Path(tempfile.mkdtemp(prefix="lora-lens-")) / "reference.json"
        return str(ship.reference_file(self.lens.backend, self.lens.profile, n_items, out))

    def checked(self, adapter, prompt, n_items):
        """The merge check's inputs checked (before any GPU call): (adapter name, prompt, n_items)."""
        self.lens.require_adapter("The merge check")
        if not isinstance(adapter, str) or not adapter:
            raise InputError("adapter must name a loaded adapter (see /adapters; fine_tuned is the primary).")
        name = self.lens.backend.adapter_named(adapter)["name"]
        prompt = clean_prompt(prompt)[0] if prompt else self.default_prompt()
        n = parse_number("n_items", n_items, integer=True)
        if not 0 <= n <= ship.MAX_ITEMS:
            raise InputError(f"n_items must be between 0 and {ship.MAX_ITEMS}; got {n}.")
        return name, prompt, n

    @user_errors
    def merge_check(self, adapter: str = FINE_TUNED, n_items: int = CHECK_ITEMS, prompt: str = "") -> dict:
        """How much of the adapter survives each way of merging it into the base, before you ship it.

        Routes: nf4 (merged into the 4-bit weights and re-quantized, as merge_and_unload on a 4-bit model),
        bf16 / fp16 / fp32 (merged into the de-quantized base, kept in that dtype), original (merged into the
        base's own full-precision weights, where they are on the server). Each is compared with the unmerged
        adapter on the 4-bit base, the model it was trained and evaluated with.
        Args:
            adapter: a loaded adapter (see /adapters); "fine_tuned" is the primary
            n_items: catalog test items to answer under each merged copy (pricer profiles), 0-50
            prompt: the prompt whose base and fine-tuned texts are scored teacher-forced under each copy; empty
                for a catalog item (pricers) or a general prompt
        Returns:
            merge_check: {"adapter", "verdict", "prompt", "items", "routes": [{"route", "label", "median_lost",
            "worst_lost", "mean_kl", "mean_logprob_change", "same_answers", "texts"}], "metrics": {"unmerged" | route: {"count", "mae",
            "rmsle", "hit_rate", "unparsed"}}, "modules": [{"layer", "module", "delta_fro", "lost": {route:
            float}}], "skipped": {route: why}, "reference_texts"}. lost = ||W' - W - dW|| / ||dW|| per layer (0:
            the update kept; 1: an error as large as the update); mean_kl is KL(unmerged || merged) per token
            along the prompt's texts and mean_logprob_change the mean change of the written tokens' log p
            (merged minus unmerged); same_answers the share of greedy answers equal to the unmerged adapter's.
        """
        return self._gpu_check(*self.checked(adapter, prompt, n_items)).as_json()

    def export_file(self, kind, strength=1.0) -> str:
        """The export of `kind` (EXPORTS) as a file path."""
        if kind not in EXPORTS:
            raise InputError(f"kind must be one of {', '.join(EXPORTS)}; got {str(kind)[:40]!r}.")
        self.lens.require_adapter("Exporting the adapter")
        folder = Path(tempfile.mkdtemp(prefix="lora-lens-"))
        if kind == "reference":
            return self._gpu_reference(CHECK_ITEMS)
        if kind == "gguf":
            return str(ship.export_gguf(self.lens.backend, folder / "adapter-lora-f32.gguf"))
        s = check_strength(strength)
        import shutil

        exported = ship.export_adapter(self.lens.backend, s, folder / f"adapter-s{s:g}")
        return shutil.make_archive(str(exported), "zip", root_dir=exported)

    @user_errors
    def export(self, kind: str = "adapter", strength: float = 1.0) -> str:
        """A file that ships the fine-tune.

        Args:
            kind: "adapter" (the primary adapter at strength s as a peft folder, zipped: every lora_B times s,
                adapter_config.json unchanged; peft and vLLM load it as is), "gguf" (the adapter as a GGUF LoRA
                for llama.cpp, f32, as its convert_lora_to_gguf.py writes it), or "reference" (greedy texts and
                per-token log-probabilities under base and fine-tune for the evaluation prompts, JSON)
            strength: s for kind "adapter", -2 to 3 (1 = as trained; 0 = the base)
        Returns:
            file: the exported file
        """
        return self.export_file(kind, strength)


class ShipTab(ShipEndpoints):
    """The tab's handlers (hidden from the API page)."""

    @user_errors
    def ui_check(self, adapter, prompt, n_items, route):
        try:
            name, prompt, n = self.checked(adapter, prompt, n_items)
        except InputError as exc:
            return unchanged(exc, 5)
        started = time.perf_counter()
        result = self._gpu_check(name, prompt, n)
        seconds = time.perf_counter() - started
        route = route if route in result.check.routes else result.check.routes[0]
        verdict = f"{result.check.verdict()}\n\n*{seconds:.1f} s; {n} items.*"
        return (
            verdict,
            ship_views.routes_markdown(result),
            ship_views.lost_figure(result.check, route),
            ship_views.answers_frame(result),
            result,
        )

    def ui_route(self, result, route):
        if result is None or route not in result.check.routes:
            return gr.skip()
        return ship_views.lost_figure(result.check, route)

    @user_errors
    def ui_export(self, kind, strength):
        return self.export_file(kind, strength)


def layout(tab: ShipTab) -> None:
    lens = tab.lens
    # /export returns a file, so it is an event on a File output (gr.api returns JSON only)
    gr.Button(visible=False).click(
        tab.export,
        inputs=[gr.Textbox(visible=False), gr.Number(visible=False)],
        outputs=[gr.File(visible=False)],
        api_name="export",
        api_description=inspect.getdoc(tab.export),
        **ON_MODEL,
    )
    if not lens.has_adapter:
        gr.Markdown("No adapter is loaded (base-only), so there is nothing to merge or export.")
        return
    names = [a["name"] for a in lens.info.adapters] or [FINE_TUNED]
    gr.Markdown(
        "### Merge check\nMerging a LoRA into a 4-bit base re-quantizes the sum, and an update of about 1% of W "
        "sits below NF4's step: it can round away. Each route below is compared, layer by layer and by what the "
        "merged copy answers, with the unmerged adapter on the 4-bit base (the model it was trained and "
        "evaluated with). A merged copy of the model is built for each route, run and freed."
    )
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            prompt = gr.Textbox(value=tab.default_prompt(), label="Prompt scored under each copy", lines=4)
        with gr.Column(scale=2, min_width=260):
            adapter = gr.Dropdown(names, value=names[0], label="Adapter", visible=len(names) > 1)
            n_items = gr.Slider(
                0, ship.MAX_ITEMS, value=CHECK_ITEMS if lens.profile.is_pricer else 0, step=1,
                label="Catalog items answered under each copy", visible=lens.profile.is_pricer,
            )  # fmt: skip
            run = gr.Button("Check the merge routes", variant="primary", elem_id="lens-ship-run")
    verdict = gr.Markdown(elem_id="lens-ship-verdict")
    routes = gr.Markdown(elem_id="lens-ship-routes", elem_classes=TABLE)
    with gr.Row(equal_height=False):
        with gr.Column(min_width=320):
            route = gr.Radio(list(ROUTES), value="nf4", label="Heatmap of the route")
            heatmap = gr.Plot(show_label=False, elem_id="lens-ship-heatmap")
        with gr.Column(min_width=320):
            answers = gr.Dataframe(
                label="Greedy answers", interactive=False, wrap=True, elem_id="lens-ship-answers"
            )
    state = gr.State(None)
    run.click(
        tab.ui_check,
        inputs=[adapter, prompt, n_items, route],
        outputs=[verdict, routes, heatmap, answers, state],
        **ON_MODEL,
        **PRIVATE,
    )
    route.change(tab.ui_route, inputs=[state, route], outputs=[heatmap], queue=False, **PRIVATE)

    gr.Markdown("### Exports")
    with gr.Row(equal_height=False):
        with gr.Column(min_width=300):
            kind = gr.Radio([(label, key) for key, label in EXPORTS.items()], value="adapter", label="What")
            strength = gr.Slider(-2, 3, value=1.0, step=0.05, label="Strength s of the exported adapter")
            export_btn = gr.Button("Export", elem_id="lens-ship-export")
        with gr.Column(min_width=300):
            exported = gr.File(label="Download", interactive=False, elem_id="lens-ship-file")
            gr.Markdown(ship_views.merged_export_markdown(lens.report), elem_classes=TABLE)
    export_btn.click(tab.ui_export, inputs=[kind, strength], outputs=[exported], **ON_MODEL, **PRIVATE)
