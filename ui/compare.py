"""The Compare tab: base and fine-tuned streamed side by side from one batch, the fine-tune at any strength,
the divergence, and for pricer prompts the prices (with the catalog's true price); plus /compare, /generate
and /estimate_price."""

import functools
import threading
from dataclasses import replace

import gradio as gr

from ui import views
from ui.common import (
    ON_MODEL,
    PRIVATE,
    TABLE,
    example_prompts,
    generation_settings,
    pane,
    stop_run,
    unchanged,
    user_errors,
    warn_all,
)
from ui.lens import After, Afterwards, Lens, until_stopped
from ui.prompt_format import GIVEN_CSS, PromptFormats, formatted, given_html
from ui.prompt_format import controls as format_controls
from ui.token_lens import TokenLens, lens_outputs
from ui.token_lens import layout as token_lens_layout
from ui.views.sweep import formula_markdown
from utils.core import inputs
from utils.core.errors import InputError
from utils.core.inputs import STRENGTH_RANGE, check_strength, clean_prompt
from utils.core.prompt_format import parse_format
from utils.core.seam import BASE, FINE_TUNED, GenerationSettings
from utils.task import pricing

PRICE_TOKENS = 8  # greedy tokens for /estimate_price: "999.99" is six digit-tokens for SmolLM2
# What the Compare handler updates, in order: the two pane columns, texts and stats, the divergence, the prices.
COMPARE_OUTPUTS = (
    "base_col", "tuned_col", "base_text", "base_stats", "tuned_text", "tuned_stats", "divergence",
    "price_col", "price_md", "price_plot", "lens_col", "lens_html", "lens_summary", "lens_plot", "given",
)  # fmt: skip
N_PANE_OUTPUTS = 7  # the pane columns, texts and stats, and the divergence: what each streamed step redraws


def mode_choices(has_adapter: bool):
    if not has_adapter:
        return [("Base only (no adapter loaded)", "base")]
    return [
        ("Both, side by side", "both"),
        ("Base only (adapter detached)", "base"),
        ("Fine-tuned only (adapter attached)", "fine_tuned"),
    ]


class CompareEndpoints:
    """/compare, /generate and /estimate_price over one Lens."""

    def __init__(self, lens: Lens):
        self.lens = lens
        self.formats = PromptFormats(lens)

    def _formatted(self, prompt, rows, formats, settings):  # each pane's prompt in its format, warnings shown
        rows, rendered = self.formats.apply(prompt, rows, formats, settings.max_new_tokens)
        warn_all(self.formats.warnings(rendered))
        return rows

    @user_errors
    def compare(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        panes: list | None = None,
        prompt_format: str | dict | None = None,
        base_format: str | dict | None = None,
    ) -> tuple[str | list[str], str | list[str]]:
        """Generate from the same prompt with the adapter detached (base) and attached (fine-tuned), or in any
        panes of the loaded adapters, in one batch.

        Args:
            prompt: the text to continue; for the pricer, a prompt ending in "Price is $" (see /estimate_price)
            max_new_tokens: tokens per pane, 1-512 (larger values are clamped)
            temperature: 0 for greedy decoding (deterministic), up to 2 to sample
            top_p: nucleus sampling mass, 0.01-1
            seed: seeds the sampler, 0 to 4294967295, so a sampled run can be repeated
            panes: null for base and fine-tuned; else 1 to 6 panes, [{"adapter": name or null (the base),
                "strength": s, "format": optional}, ...], each adapter one of /adapters ("fine_tuned" is the
                primary), s from -2 to 3, format that pane's own prompt format (as prompt_format)
            prompt_format: what each model is given (see /render_prompt): "raw" (the text as typed), "chat"
                (the base tokenizer's chat template), "adapter" (the adapter's own template), or {"kind",
                "system", "template"}; null for the profile's default (raw for pricer profiles)
            base_format: the base pane's own format where it differs (as prompt_format); null for the same
        Returns:
            base_text: the base's continuation (adapter detached); with panes, the list of texts, one per pane in
                the order given
            fine_tuned_text: the fine-tune's continuation (adapter attached); with panes, the list of the panes'
                labels ("Base", "step-100", "final (s = 0.5)", ...)
        """
        settings, notices = GenerationSettings.checked(max_new_tokens, temperature, top_p, seed)
        if panes is None and not self.lens.has_adapter:
            raise InputError(
                "No adapter is loaded (base-only), so there is nothing to compare: use /generate."
            )
        rows, formats = self.formats.rows_and_formats(prompt_format, base_format, panes)
        rows = self._formatted(prompt, rows, formats, settings)
        result, _ = self.lens.finished_run(prompt, rows, settings, notices)
        if panes is not None:
            return [result.text(row.key) for row in rows], [row.label for row in rows]
        return result.text(BASE), result.text(FINE_TUNED)

    @user_errors
    def generate(
        self,
        prompt: str,
        use_adapter: bool = True,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        strength: float = 1.0,
        adapter: str = FINE_TUNED,
        prompt_format: str | dict | None = None,
    ) -> str:
        """Generate one continuation, with a LoRA adapter attached (fine-tuned) or detached (base).

        Args:
            prompt: the text to continue
            use_adapter: true for the fine-tuned model, false for the base
            max_new_tokens: tokens to generate, 1-512 (larger values are clamped)
            temperature: 0 for greedy decoding (deterministic), up to 2 to sample
            top_p: nucleus sampling mass, 0.01-1
            seed: seeds the sampler, 0 to 4294967295
            strength: the adapter strength s when use_adapter is true, -2 to 3: each LoRA layer outputs
                W x + s * (alpha / r) * B A x (1 = the fine-tune as trained, 0 = the base)
            adapter: which loaded adapter when use_adapter is true (see /adapters); "fine_tuned" is the primary
            prompt_format: what the model is given, as /compare takes it; null for the profile's default
        Returns:
            text: the generated continuation (without the prompt)
        """
        use_adapter = inputs.check_flag("use_adapter", use_adapter)
        settings, notices = GenerationSettings.checked(max_new_tokens, temperature, top_p, seed)
        strength = check_strength(strength)
        if use_adapter and not self.lens.has_adapter:
            raise InputError("No adapter is loaded (base-only): call /generate with use_adapter=false.")
        rows = self.lens.backend.rows_for("fine_tuned" if use_adapter else "base", strength)
        if use_adapter:  # the fine-tuned pane runs the adapter named (FINE_TUNED: the primary)
            rows = [replace(row, adapter=self.lens.backend.adapter_named(adapter)["name"]) for row in rows]
        shared = parse_format(prompt_format, default=self.formats.default)
        rows = self._formatted(prompt, rows, {row.key: shared for row in rows}, settings)
        result, _ = self.lens.finished_run(prompt, rows, settings, notices)
        return result.text(FINE_TUNED if use_adapter else BASE)

    @user_errors
    def estimate_price(self, description: str) -> dict:
        """Price a product description with base and fine-tuned: the greedy answer and the top-K estimate.

        The description is put into the profile's task prompt ("How much does this cost ... Price is $").
        Args:
            description: the product description, e.g. "Stainless steel water bottle, 750 ml, leak-proof lid"
        Returns:
            prices: {"prompt", "k", "panes": {"base" | "fine_tuned": {"label", "text", "extracted_price",
            "topk_estimate", "topk_price", "candidates": [{"token", "value", "probability"}]}}}. extracted_price
            is the number the greedy text starts with; topk_estimate the lesson's probability-weighted mean of
            the K most likely numeric next tokens; topk_price that mean at the greedy number's magnitude.
        """
        from utils.task.pricing import build_prompt

        lens = self.lens
        lens.require_pricer("Price estimates")
        prompt = build_prompt(description, lens.profile.task_prompt)
        rows = lens.backend.rows_for(lens.both_or_base())
        settings = GenerationSettings(max_new_tokens=PRICE_TOKENS)
        result, after = lens.run(prompt, rows, settings, After(price_scan=views.PRICE_SCAN))
        texts = {key: p.text for key, p in result.panes.items()}
        estimates = lens.price_views(texts, after.next_views, rows)
        return {"prompt": prompt, "k": views.TOPK, "panes": estimates}


class CompareTab(CompareEndpoints):
    """The Compare tab's UI handlers (hidden from the API page), beside its endpoints."""

    @user_errors
    def ui_compare(
        self,
        prompt,
        mode,
        strength,
        fmt,
        base_fmt,
        system,
        template,
        max_new_tokens,
        temperature,
        top_p,
        seed,
        stop,
    ):
        """Stream the panes token by token; then, from the same GPU call, the token lens and (for a pricer
        prompt) the prices and the next-token chart. The panes' prompts are shown as each model got them."""
        lens = self.lens
        try:
            settings, notices = GenerationSettings.checked(max_new_tokens, temperature, top_p, seed)
            rows = lens.backend.rows_for(mode, strength)
            clean_prompt(prompt)
            rows, rendered, warnings = formatted(
                self.formats, prompt, rows, (fmt, system, template), base_fmt, settings.max_new_tokens
            )
        except InputError as exc:
            yield unchanged(exc, len(COMPARE_OUTPUTS))
            return
        given = given_html(rendered, rows, lens.decode, warnings)
        warn_all(notices)
        panes = tuple(row.key for row in rows)
        is_pricer = pricing.is_task_prompt(prompt, lens.profile.task_prompt)
        tuned = next((row.strength for row in rows if row.key == FINE_TUNED), 1.0)
        after = After(
            price_scan=views.PRICE_SCAN if is_pricer else 0,
            lens_strength=tuned if lens.has_adapter else None,
        )
        event = stop.start() if isinstance(stop, views.StopSignal) else threading.Event()
        decode = functools.partial(lens.decode, skip_special_tokens=True)
        update, afterwards, first = None, None, True
        for item in until_stopped(lens.stream(prompt, rows, settings, after), event):
            if isinstance(item, Afterwards):
                afterwards = item
                continue
            update = item
            if first:
                for notice in update.notices:
                    gr.Info(notice)
            yield pane_outputs(update, panes, update.finished, first, decode) + (
                given if first else gr.skip(),
            )
            first = False
        if update is None or afterwards is None or event.is_set():
            return
        prices = (gr.skip(),) * 3
        if afterwards.next_views is not None:
            texts = {key: state.text for key, state in update.panes.items()}
            labels = {row.key: row.label for row in rows}
            estimates = lens.price_views(texts, afterwards.next_views, rows)
            figure = views.next_token_figure(views.next_token_frame(afterwards.next_views, labels=labels))
            truth = pricing.catalog_truth(prompt, lens.profile.task_prompt)
            prices = (gr.Column(visible=True), views.price_table_markdown(estimates, truth=truth), figure)
        scored = lens_outputs(afterwards.scored, rows) if afterwards.scored is not None else (gr.skip(),) * 4
        yield (gr.skip(),) * N_PANE_OUTPUTS + prices + scored + (gr.skip(),)

    def ui_open_item(self, event: gr.SelectData):
        """A selected row of an item table (its first cell the description): that item in Compare."""
        from utils.task.pricing import build_prompt

        row = getattr(event, "row_value", None) or []
        if len(row) < 2 or not isinstance(row[0], str) or not isinstance(row[1], (int, float)):
            return gr.skip(), gr.skip()
        if not self.lens.profile.is_pricer:
            return gr.skip(), gr.skip()
        return gr.Tabs(selected="compare"), build_prompt(row[0], self.lens.profile.task_prompt)

    @user_errors
    def ui_wrap(self, prompt):
        """Put a bare product description into the pricer's task prompt."""
        from utils.task.pricing import build_prompt

        self.lens.require_pricer("Wrapping a description")
        if pricing.is_task_prompt(prompt, self.lens.profile.task_prompt):
            return prompt
        return build_prompt(prompt, self.lens.profile.task_prompt)


def layout(tab: CompareTab, stop: gr.State) -> gr.Textbox:
    """The tab's components, with the token lens under the panes, scoring each finished comparison. Returns
    the prompt box (other tabs open an item here)."""
    lens, profile = tab.lens, tab.lens.profile
    token_lens = TokenLens(lens)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            prompt = gr.Textbox(
                label="Prompt",
                lines=6,
                max_lines=14,
                placeholder="A product description in the pricer prompt, or any text to continue.",
                elem_id="lens-prompt",
            )
            example_prompts(prompt, profile, "Examples (catalog items are synthetic, from the test split)")
        with gr.Column(scale=2, min_width=280):
            mode = gr.Radio(mode_choices(lens.has_adapter), value=lens.both_or_base(), label="Panes")
            attached = gr.Checkbox(
                value=lens.has_adapter,
                interactive=False,
                label="Adapter attached",
                info="In single-pane mode, attach (fine-tuned) or detach (base) the LoRA adapter.",
            )
            strength = gr.Slider(
                *STRENGTH_RANGE,
                value=1.0,
                step=0.05,
                label="Adapter strength s of the fine-tuned pane (the base pane is s = 0)",
                interactive=lens.has_adapter,
                elem_id="lens-strength",
            )
            gr.Markdown(
                formula_markdown(lens.adapter_lora if lens.has_adapter else None),
                elem_classes=["lens-stats"],
            )
            fmt, base_fmt, system, template = format_controls(tab.formats, with_base=lens.has_adapter)
            max_new_tokens, temperature, top_p, seed = generation_settings()
            with gr.Row():
                run_btn = gr.Button("Compare", variant="primary", elem_id="lens-run", min_width=120)
                stop_btn = gr.Button("Stop", variant="stop", elem_id="lens-stop", min_width=80)
            wrap_btn = gr.Button(
                "Wrap a description in the pricer prompt", size="sm", visible=profile.is_pricer
            )
            others = lens.backend.adapter_names[1:]
            if others:
                gr.Markdown(
                    f"{len(others)} more adapter(s) loaded ({', '.join(others)}): run any of them side by side "
                    "in the Strength sweep tab, compare their updates in the Adapters tab.",
                    elem_classes=["lens-stats"],
                )
    with gr.Row(equal_height=True):
        base_col, base_text, base_stats = pane(BASE)
        tuned_col, tuned_text, tuned_stats = pane(FINE_TUNED, visible=lens.has_adapter)
    divergence = gr.HTML(css_template=views.DIVERGENCE_CSS, elem_id="lens-divergence")
    with gr.Accordion("What each pane was given (the prompt in its format)", open=False):
        given = gr.HTML(css_template=GIVEN_CSS, elem_id="lens-given")
    with gr.Column(visible=False) as price_col:
        gr.Markdown("### The price, read two ways")
        with gr.Row():
            with gr.Column(min_width=300):
                price_md = gr.Markdown(elem_id="lens-prices", elem_classes=TABLE)
            with gr.Column(min_width=300):
                price_plot = gr.Plot(
                    label="Next-token probabilities", show_label=False, elem_id="lens-next-token"
                )
    lens_section = token_lens_layout(token_lens)["outputs"]

    outputs = [base_col, tuned_col, base_text, base_stats, tuned_text, tuned_stats, divergence]
    outputs += [price_col, price_md, price_plot, *lens_section, given]  # in the order of COMPARE_OUTPUTS
    base_fmt = base_fmt if base_fmt is not None else gr.State(None)
    run = run_btn.click(
        tab.ui_compare,
        inputs=[prompt, mode, strength, fmt, base_fmt, system, template]
        + [max_new_tokens, temperature, top_p, seed, stop],
        outputs=outputs,
        show_progress="minimal",
        **ON_MODEL,
        **PRIVATE,
    )
    # Stop sets the run's event at once (not queued) and also cancels the event, should it still be queued.
    stop_btn.click(stop_run, inputs=[stop], outputs=None, queue=False, cancels=[run], **PRIVATE)
    mode.input(follow_mode, inputs=[mode], outputs=[attached], queue=False, **PRIVATE)
    attached.input(toggle_adapter, inputs=[attached, mode], outputs=[mode], queue=False, **PRIVATE)
    wrap_btn.click(tab.ui_wrap, inputs=[prompt], outputs=[prompt], queue=False, **PRIVATE)
    return prompt


def toggle_adapter(attached, mode):
    """Attaching or detaching the adapter in single-pane mode switches between the two panes."""
    if mode == "both":
        return gr.skip()
    return "fine_tuned" if attached else "base"


def follow_mode(mode):
    """The adapter toggle follows the pane choice: fixed in 'both', attached for the fine-tuned pane."""
    return gr.Checkbox(value=mode != "base", interactive=mode != "both")


def pane_outputs(update, panes, finished, first, decode):
    """Values for COMPARE_OUTPUTS (decode: token ids to text): column visibility (first update only), texts, stats, divergence."""
    skip = gr.skip()
    out = [
        gr.Column(visible=BASE in panes) if first else skip,
        gr.Column(visible=FINE_TUNED in panes) if first else skip,
    ]
    for key in (BASE, FINE_TUNED):
        state = update.panes.get(key) if update is not None else None
        out += [state.text if state else "", views.pane_stats(state)]
    if update is not None and len(panes) == 2:
        out.append(views.divergence_html(update.panes[BASE], update.panes[FINE_TUNED], decode, finished))
    else:
        out.append("")
    out += [gr.Column(visible=False) if first else skip, skip, skip]  # the prices
    out += [gr.Column(visible=False) if first else skip, skip, skip, skip]  # the token lens
    return tuple(out)
