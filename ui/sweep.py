"""The Strength sweep tab: one prompt, up to six adapter strengths, one pane per strength streamed together
from one batch; for pricer prompts the price against strength (with the true price for catalog items);
plus /sweep."""

import threading

import gradio as gr

from ui import views
from ui.common import (
    ON_MODEL,
    PRIVATE,
    TABLE,
    example_prompts,
    generation_settings,
    stop_run,
    unchanged,
    user_errors,
    warn_all,
)
from ui.lens import NOTHING_AFTER, After, Afterwards, Lens, until_stopped
from ui.views.sweep import DEFAULT_STRENGTHS, formula_markdown, price_figure, sweep_json
from utils.core.errors import InputError
from utils.core.inputs import MAX_SWEEP_ROWS, clean_prompt, parse_strengths
from utils.core.seam import GenerationSettings
from utils.task import pricing


class SweepTab:
    def __init__(self, lens: Lens):
        self.lens = lens

    @user_errors
    def sweep(
        self,
        prompt: str,
        strengths: str = DEFAULT_STRENGTHS,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list:
        """Generate the same prompt at several adapter strengths s, all rows of one batch.

        Each LoRA layer outputs W x + s * (alpha / r) * B A x: s = 0 is the base, s = 1 the fine-tune.
        Args:
            prompt: the text to continue
            strengths: 1 to 6 strengths, each -2 to 3, separated by commas or spaces (e.g. "0, 0.5, 1, 1.5, 2")
            max_new_tokens: tokens per row, 1-512 (larger values are clamped)
            temperature: 0 for greedy decoding (deterministic), up to 2 to sample
            top_p: nucleus sampling mass, 0.01-1
            seed: seeds the sampler, 0 to 4294967295
        Returns:
            sweep: [{"strength": float, "text": str}, ...], one per strength in the order given
        """
        values = parse_strengths(strengths)
        settings, notices = GenerationSettings.checked(max_new_tokens, temperature, top_p, seed)
        rows = self.lens.backend.sweep_rows(values)
        result, _ = self.lens.finished_run(prompt, rows, settings, notices)
        return sweep_json(values, [result.text(row.key) for row in rows])

    @user_errors
    def ui_sweep(self, prompt, strengths, max_new_tokens, temperature, top_p, seed, stop):
        """Stream every strength's pane; then, for a pricer prompt, the price against strength."""
        lens = self.lens
        n_outputs = 2 * MAX_SWEEP_ROWS + 3
        try:
            values = parse_strengths(strengths)
            settings, notices = GenerationSettings.checked(max_new_tokens, temperature, top_p, seed)
            rows = lens.backend.sweep_rows(values)
            clean_prompt(prompt)
        except InputError as exc:
            yield unchanged(exc, n_outputs)
            return
        warn_all(notices)
        event = stop.start() if isinstance(stop, views.StopSignal) else threading.Event()
        is_pricer = pricing.is_task_prompt(prompt, lens.profile.task_prompt)
        after = After(price_scan=views.PRICE_SCAN) if is_pricer else NOTHING_AFTER
        update, afterwards, first = None, None, True
        for item in until_stopped(lens.stream(prompt, rows, settings, after), event):
            if isinstance(item, Afterwards):
                afterwards = item
                continue
            update, out = item, []
            for i in range(MAX_SWEEP_ROWS):
                if i < len(rows):
                    state = update.panes[rows[i].key]
                    text = (
                        gr.Textbox(value=state.text, label=rows[i].label, visible=True)
                        if first
                        else state.text
                    )
                    out += [text, views.pane_stats(state)]
                else:
                    out += [gr.Textbox(value="", visible=False) if first else gr.skip(), ""]
            out += [gr.Column(visible=False) if first else gr.skip(), gr.skip(), gr.skip()]
            first = False
            yield tuple(out)
        if update is None or afterwards is None or event.is_set() or afterwards.next_views is None:
            return
        texts = {key: state.text for key, state in update.panes.items()}
        estimates = lens.price_views(texts, afterwards.next_views, rows)
        truth = pricing.catalog_truth(prompt, lens.profile.task_prompt)
        figure = price_figure(values, [estimates[row.key] for row in rows], truth)
        table = views.price_table_markdown(estimates, truth=truth)
        yield (gr.skip(),) * (2 * MAX_SWEEP_ROWS) + (gr.Column(visible=True), table, figure)


def layout(tab: SweepTab, stop: gr.State) -> None:
    lens = tab.lens
    gr.Markdown(
        "The same prompt at several adapter strengths, every strength one row of ONE batch over the one "
        "model. " + formula_markdown(lens.adapter_lora if lens.has_adapter else None)
    )
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            prompt = gr.Textbox(label="Prompt", lines=5, max_lines=12, elem_id="lens-sweep-prompt")
            example_prompts(prompt, lens.profile)
        with gr.Column(scale=2, min_width=280):
            strengths = gr.Textbox(
                value=DEFAULT_STRENGTHS if lens.has_adapter else "0",
                label=f"Strengths s (1 to {MAX_SWEEP_ROWS}, from -2 to 3)",
                elem_id="lens-sweep-strengths",
            )
            max_new_tokens, temperature, top_p, seed = generation_settings(max_new_tokens=32)
            with gr.Row():
                run_btn = gr.Button("Sweep", variant="primary", elem_id="lens-sweep-run", min_width=120)
                stop_btn = gr.Button("Stop", variant="stop", min_width=80)
    outputs = []
    with gr.Row(equal_height=True):
        for i in range(MAX_SWEEP_ROWS):
            with gr.Column(min_width=220):
                text = gr.Textbox(
                    label=f"Strength {i + 1}",
                    lines=6,
                    max_lines=16,
                    interactive=False,
                    visible=False,
                    elem_id=f"lens-sweep-pane-{i}",
                )
                stats = gr.Markdown(elem_classes=["lens-stats"], elem_id=f"lens-sweep-stats-{i}")
            outputs += [text, stats]
    with gr.Column(visible=False) as price_col:
        gr.Markdown("### The price against strength")
        with gr.Row():
            with gr.Column(min_width=300):
                price_md = gr.Markdown(elem_id="lens-sweep-prices", elem_classes=TABLE)
            with gr.Column(min_width=300):
                price_plot = gr.Plot(show_label=False, elem_id="lens-sweep-chart")
    outputs += [price_col, price_md, price_plot]
    run = run_btn.click(
        tab.ui_sweep,
        inputs=[prompt, strengths, max_new_tokens, temperature, top_p, seed, stop],
        outputs=outputs,
        show_progress="minimal",
        **ON_MODEL,
        **PRIVATE,
    )
    stop_btn.click(
        stop_run,
        inputs=[stop],
        outputs=None,
        queue=False,
        cancels=[run],
        **PRIVATE,
    )
