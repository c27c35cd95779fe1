"""The Adapter anatomy tab: where the update lives (a layers x modules heatmap, absolute or relative to the
base weight), how many of its r dimensions it uses (singular values per module, effective and stable rank),
and what each part does (ablation of chosen layers and modules, and a ranking of layer blocks); plus
/anatomy and /ablate."""

import time

import gradio as gr

from ui import views
from ui.common import ON_MODEL, PRIVATE, TABLE, unchanged, user_errors
from ui.lens import After, Lens
from ui.views import anatomy as anatomy_views
from utils.analysis import anatomy as anat
from utils.core.errors import InputError
from utils.core.inputs import clean_prompt
from utils.core.seam import FINE_TUNED, GenerationSettings, Row
from utils.task import pricing
from utils.task.pricing import extract_price

DEFAULT_MODULES = "q_proj,k_proj,v_proj,o_proj"
BLOCK_SIZE = 5  # layers per block in the ranking sweep
SWEEP_TOKENS = 12  # greedy tokens per row in the ranking sweep (a price is at most six for SmolLM2)


class Anatomies:
    """Each adapter's anatomy, computed once (under the model's lock, a layer at a time), then cached."""

    def __init__(self, lens: Lens):
        self.lens = lens
        self.data: dict[str, anat.Anatomy] = {}  # adapter name -> its anatomy
        self.seconds: dict[str, float] = {}  # how long each computation took

    def name(self, adapter) -> str:
        """The adapter's own name (FINE_TUNED: the primary's), checked against those loaded."""
        if not self.lens.info.adapters:
            return FINE_TUNED
        if not isinstance(adapter, str) or not adapter:
            raise InputError("adapter must name a loaded adapter (see /adapters; fine_tuned is the primary).")
        return self.lens.backend.adapter_named(adapter)["name"]

    def get(self, adapter: str = FINE_TUNED) -> anat.Anatomy:
        self.lens.require_adapter("The adapter anatomy")
        name = self.name(adapter)
        if name not in self.data:
            started = time.perf_counter()
            self.data[name] = self.lens.anatomy(name)
            self.seconds[name] = time.perf_counter() - started
        return self.data[name]

    def cached(self, adapter: str = FINE_TUNED) -> anat.Anatomy | None:
        return self.data.get(self.name(adapter))


class AnatomyEndpoints:
    """/anatomy and /ablate over one Lens, and what the tab's handlers share with them."""

    def __init__(self, lens: Lens):
        self.lens = lens
        self.anatomies = Anatomies(lens)

    def anatomy_data(self, adapter: str = FINE_TUNED) -> anat.Anatomy:
        """Computed once per adapter, then cached (Anatomies)."""
        return self.anatomies.get(adapter)

    def modules(self) -> list[tuple[int, str]]:
        """(layer, module) of every adapted layer, in the backend's order, from the names alone (no weights)."""
        return [anat.parse_module_name(name) for name in self.lora_layers]

    def module_names(self) -> list[str]:
        return list(dict.fromkeys(module for _, module in self.modules()))

    @property
    def lora_layers(self) -> tuple[str, ...]:
        return self.lens.info.lora_layers

    def n_layers(self) -> int:
        return self.lens.info.n_layers

    # -----------------------------------------------------------------------------------------------
    # API endpoints

    @user_errors
    def anatomy(self, adapter: str = FINE_TUNED) -> dict:
        """A loaded adapter, module by module: the size of its update and how many of its r dimensions it uses.

        For each adapted layer ΔW = (alpha / r) * B A; its singular values come from QR of B and of A transposed
        and an r x r SVD (ΔW is never formed); the base weight is de-quantized one layer at a time.
        Args:
            adapter: which adapter (see /adapters); "fine_tuned" (the default) is the primary
        Returns:
            anatomy: {"r": int, "alpha": float, "modules": [{"layer": int, "module": str, "delta_fro": float,
            "base_fro": float, "relative": float, "singular_values": [float, ...], "effective_rank_90": int,
            "stable_rank": float}]}. delta_fro = ||ΔW||_F, base_fro = ||W||_F, relative = their ratio;
            effective_rank_90: dimensions holding 90% of sum(singular value^2); stable_rank: ||ΔW||_F^2 / max^2
        """
        return anatomy_views.anatomy_json(self.anatomy_data(adapter))

    def _ablation_rows(self, layers, modules) -> list[Row]:
        self.lens.require_adapter("Ablation")
        known = self.module_names()
        layer_list = anat.parse_layers(layers, self.n_layers())
        module_list = anat.parse_modules(modules, known)
        off = anat.ablation_strengths(self.lora_layers, layer_list, module_list)
        return [
            Row("base", "Base (s = 0)", 0.0),
            Row("full", "Full adapter", 1.0),
            Row("ablated", "Ablated", off),
        ]

    @user_errors
    def ablate(
        self,
        prompt: str,
        layers: str = anat.ALL_LAYERS,
        modules: str = DEFAULT_MODULES,
        max_new_tokens: int = 64,
    ) -> dict:
        """Switch the adapter off on some layers and modules and compare with the full adapter and the base.

        All three are rows of one greedy batch: the base (strength 0 everywhere), the full adapter (1
        everywhere), and the ablated adapter (0 on the chosen layers x modules, 1 elsewhere).
        Args:
            prompt: the text to continue
            layers: decoder layers to switch off: ranges and lists such as "0-4,10", or "all" (the default:
                every layer of the loaded model)
            modules: adapted modules to switch off in those layers, comma-separated (e.g. "q_proj,v_proj")
            max_new_tokens: tokens per row, 1-512 (larger values are clamped)
        Returns:
            ablation: {"base": str, "full": str, "ablated": str, "prices": {"base", "full", "ablated"}
            (the number each text starts with, for pricer prompts; null otherwise)}
        """
        return self._ablate(prompt, layers, modules, max_new_tokens)

    def _ablate(self, prompt, layers, modules, max_new_tokens) -> dict:
        settings, notices = GenerationSettings.checked(max_new_tokens)
        rows = self._ablation_rows(layers, modules)
        result, _ = self.lens.finished_run(prompt, rows, settings, notices)
        texts = {row.key: result.text(row.key) for row in rows}
        prices = None
        if pricing.is_task_prompt(prompt, self.lens.profile.task_prompt):
            prices = {key: extract_price(text) for key, text in texts.items()}
        return texts | {"prices": prices}


class AnatomyTab(AnatomyEndpoints):
    """The tab's UI handlers. The controls redraw from the cached anatomy only: computing it here would be a
    second GPU call, outside the model slot, when the Architecture tab sets the module before the tab's opening
    fills the cache."""

    @user_errors
    def ui_heatmap(self, scale, adapter=FINE_TUNED):
        data = self.anatomies.cached(adapter)
        if data is None:
            return gr.skip()
        return anatomy_views.heatmap_figure(data, relative=scale == "relative")

    @user_errors
    def ui_module(self, value, adapter=FINE_TUNED):
        data = self.anatomies.cached(adapter)
        if not value or data is None:
            return gr.skip()
        layer, module = value.split(":", 1)
        return anatomy_views.singular_values_figure(data.find(int(layer), module), data.r)

    @user_errors
    def ui_ablate(self, prompt, layers, modules, max_new_tokens):
        try:
            clean_prompt(prompt)
            out = self._ablate(prompt, layers, ",".join(modules or []), max_new_tokens)
        except InputError as exc:
            return unchanged(exc, 4)
        prices = out["prices"]
        truth = pricing.catalog_truth(prompt, self.lens.profile.task_prompt)
        md = ""
        if prices is not None:
            money = {k: "n/a" if v is None else f"${v:,.2f}" for k, v in prices.items()}
            md = f"Prices — base {money['base']}, full adapter {money['full']}, ablated {money['ablated']}"
            md += f"; true price ${truth:,.2f}." if truth else "."
        return out["base"], out["full"], out["ablated"], md

    @user_errors
    def ui_block_sweep(self, prompt, modules):
        """Rank blocks of BLOCK_SIZE layers by how much switching them off moves the fine-tuned answer."""
        try:
            prompt, _ = clean_prompt(prompt)
            module_list = anat.parse_modules(",".join(modules or []), self.module_names())
        except InputError as exc:
            return unchanged(exc, 1)
        import pandas as pd

        return pd.DataFrame(self.block_sweep(prompt, module_list))

    def block_sweep(self, prompt: str, modules: list[str]) -> list[dict]:
        """Blocks of layers ranked by how much switching them off moves the fine-tuned answer (rank_blocks)."""
        return rank_blocks(self, prompt, modules)

    # -----------------------------------------------------------------------------------------------
    # Layout

    @user_errors
    def ui_open(self, scale, value, adapter=FINE_TUNED):
        """Fill the tab on first open, or for another adapter (each anatomy is computed once, in a GPU call on
        ZeroGPU, then cached): (summary, heatmap, singular values, table)."""
        data = self.anatomy_data(adapter)
        name = self.anatomies.name(adapter)
        which = "The loaded adapter" if len(self.lens.info.adapters) < 2 else f"Adapter {name}"
        summary = (
            f"{which}, module by module (computed once in {self.anatomies.seconds[name]:.2f} s, then cached). "
            f"Each adapted layer adds ΔW = (alpha / r) · B A with r = {data.r}, alpha = {data.alpha:g}. "
            + anatomy_views.rank_sentence(data)
        )
        return (
            summary,
            self.ui_heatmap(scale, adapter),
            self.ui_module(value, adapter),
            anatomy_views.rank_frame(data),
        )


def layout(tab: AnatomyTab) -> dict | None:
    """The tab. Returns what opens it: the module selector (the Architecture tab sets it) and `open`,
    (fn, inputs, outputs) to run when the tab is shown, since its numbers are computed on first open."""
    lens = tab.lens
    if not lens.has_adapter:
        gr.Markdown("No adapter is loaded (base-only), so there is no adapter to dissect.")
        return None
    names = [a["name"] for a in lens.info.adapters] or [FINE_TUNED]
    adapter = gr.Dropdown(
        names,
        value=names[0],
        label="Adapter",
        visible=len(names) > 1,
        elem_id="lens-anatomy-adapter",
    )
    summary = gr.Markdown(
        "Computing the anatomy of the adapter ...", elem_id="lens-anatomy-summary", elem_classes=TABLE
    )
    with gr.Row():
        with gr.Column(min_width=320):
            scale = gr.Radio(
                [("||ΔW||_F", "absolute"), ("||ΔW||_F / ||W||_F", "relative")],
                value="absolute",
                label="Where the change lives",
            )
            heatmap = gr.Plot(show_label=False, elem_id="lens-anatomy-heatmap")
        with gr.Column(min_width=320):
            choices = [(f"layer {layer} · {name}", f"{layer}:{name}") for layer, name in tab.modules()]
            module = gr.Dropdown(
                choices,
                value=choices[0][1],
                label="How many of the r dimensions it uses",
                elem_id="lens-anatomy-module",
            )
            spectrum = gr.Plot(show_label=False, elem_id="lens-anatomy-sv")
    table = gr.Dataframe(label="Per module type", interactive=False, wrap=False, elem_id="lens-anatomy-ranks")
    gr.Markdown("### What each part does: switch the adapter off on some layers and modules")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            prompt = gr.Textbox(label="Prompt", lines=4, elem_id="lens-ablate-prompt")
            examples = views.example_prompts(lens.profile, n=3)
            gr.Examples(
                [[p] for _, p in examples],
                inputs=[prompt],
                example_labels=[x for x, _ in examples],
                **PRIVATE,
            )
        with gr.Column(scale=2, min_width=260):
            layers = gr.Textbox(
                value=f"0-{tab.n_layers() // 2 - 1}",
                label=f"Layers to switch off (0-{tab.n_layers() - 1}; e.g. 0-4,10)",
            )
            modules = gr.CheckboxGroup(
                tab.module_names(), value=tab.module_names(), label="Modules to switch off"
            )
            max_new_tokens = gr.Slider(1, 128, value=24, step=1, label="Max new tokens")
            with gr.Row():
                ablate_btn = gr.Button("Ablate", variant="primary", elem_id="lens-ablate-run")
                sweep_btn = gr.Button(f"Rank blocks of {BLOCK_SIZE} layers", elem_id="lens-ablate-sweep")
    with gr.Row(equal_height=True):
        base_text = gr.Textbox(label="Base (s = 0)", lines=4, interactive=False, elem_id="lens-ablate-base")
        full_text = gr.Textbox(label="Full adapter", lines=4, interactive=False, elem_id="lens-ablate-full")
        ablated_text = gr.Textbox(
            label="Ablated adapter", lines=4, interactive=False, elem_id="lens-ablate-ablated"
        )
    prices = gr.Markdown(elem_id="lens-ablate-prices", elem_classes=TABLE)
    ranking = gr.Dataframe(
        label="Layer blocks ranked by how much switching them off moves the fine-tuned answer",
        interactive=False,
        wrap=True,
        elem_id="lens-ablate-ranking",
    )

    scale.change(tab.ui_heatmap, inputs=[scale, adapter], outputs=[heatmap], **PRIVATE)
    module.change(tab.ui_module, inputs=[module, adapter], outputs=[spectrum], **PRIVATE)
    adapter.change(
        tab.ui_open,
        inputs=[scale, module, adapter],
        outputs=[summary, heatmap, spectrum, table],
        **ON_MODEL,
        **PRIVATE,
    )
    ablate_btn.click(
        tab.ui_ablate,
        inputs=[prompt, layers, modules, max_new_tokens],
        outputs=[base_text, full_text, ablated_text, prices],
        **ON_MODEL,
        **PRIVATE,
    )
    sweep_btn.click(tab.ui_block_sweep, inputs=[prompt, modules], outputs=[ranking], **ON_MODEL, **PRIVATE)
    return {
        "module": module,
        "open": (tab.ui_open, [scale, module, adapter], [summary, heatmap, spectrum, table]),
    }


def rank_blocks(tab: AnatomyTab, prompt: str, modules: list[str]) -> list[dict]:
    """One greedy batch (full adapter + one row per block switched off) and one teacher-forced batch
    scoring the full adapter's text under every ablated adapter, both in one GPU call."""
    blocks = anat.layer_blocks(tab.n_layers(), BLOCK_SIZE)
    rows = [Row("full", "Full adapter", 1.0)] + [
        Row(
            f"{a}-{b}",
            f"layers {a}-{b} off",
            anat.ablation_strengths(tab.lora_layers, range(a, b + 1), modules),
        )
        for a, b in blocks
    ]
    settings = GenerationSettings(max_new_tokens=SWEEP_TOKENS)
    result, after = tab.lens.run(prompt, rows, settings, After(score_under_rows="full"))
    logprobs = after.logprobs
    is_pricer = pricing.is_task_prompt(prompt, tab.lens.profile.task_prompt)
    full_price = extract_price(result.panes["full"].text) if is_pricer else None
    out = []
    for i, row in enumerate(rows[1:], start=1):
        text = result.panes[row.key].text
        price = extract_price(text) if is_pricer else None
        out.append(
            {
                "layers switched off": row.key,
                "log p of the fine-tuned text": round(logprobs[i], 3),
                "drop from the full adapter": round(logprobs[0] - logprobs[i], 3),
                "price": price,
                "price change": None if price is None or full_price is None else round(price - full_price, 2),
                "greedy text": text,
            }
        )
    return sorted(out, key=lambda r: -r["drop from the full adapter"])
