"""The Strength sweep tab: one prompt, up to six panes streamed together from one batch, each pane one model:
an adapter at a strength (several adapters at s = 1, or one at s = 0 .. 2, or both) or the base; for pricer
prompts the price of each pane (with the true price for catalog items); where each pane departs from the
first; and the token lens across the panes (every text under every pane's model). Plus /sweep."""

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
from ui.durations import pane_lens_too_long
from ui.lens import After, Afterwards, Lens, until_stopped
from ui.prompt_format import GIVEN_CSS, PromptFormats, formatted, given_html
from ui.prompt_format import controls as format_controls
from ui.views.lens import LENS_CSS
from ui.views.sweep import (
    DEFAULT_STRENGTHS,
    divergence_markdown,
    formula_markdown,
    pane_price_figure,
    panes_json,
    price_figure,
    sweep_json,
)
from utils.core.errors import InputError
from utils.core.inputs import MAX_SWEEP_ROWS, clean_prompt, parse_strengths
from utils.core.panes import cross_panes, pane_formats, pane_rows, parse_pane_text
from utils.core.prompt_format import parse_format
from utils.core.seam import GenerationSettings
from utils.task import pricing

N_LENS_OUTPUTS = 4  # the lens section: its column, the table, the pair's tokens, the summary


class SweepTab:
    def __init__(self, lens: Lens):
        self.lens = lens
        self.formats = PromptFormats(lens)

    def _rows(self, strengths, adapters):
        """(rows, panes or None): the primary adapter at each strength, or every model chosen at each."""
        values = parse_strengths(strengths)
        if adapters is None or (isinstance(adapters, (str, list, tuple)) and not adapters):
            return values, self.lens.backend.sweep_rows(values), None
        if not isinstance(adapters, (str, list, tuple)):
            raise InputError('adapters must be names separated by commas, such as "base, step-100, final".')
        panes = cross_panes(
            list(adapters) if not isinstance(adapters, str) else adapters, values, self.lens.backend
        )
        return values, pane_rows(panes), panes

    @user_errors
    def sweep(
        self,
        prompt: str,
        strengths: str = DEFAULT_STRENGTHS,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        adapters: str = "",
        prompt_format: str | dict | None = None,
    ) -> list:
        """Generate the same prompt at several adapter strengths s, or with several adapters, all rows of one batch.

        Each LoRA layer outputs W x + s * (alpha / r) * B A x: s = 0 is the base, s = 1 the fine-tune.
        Args:
            prompt: the text to continue
            strengths: 1 to 6 strengths, each -2 to 3, separated by commas or spaces (e.g. "0, 0.5, 1, 1.5, 2")
            max_new_tokens: tokens per row, 1-512 (larger values are clamped)
            temperature: 0 for greedy decoding (deterministic), up to 2 to sample
            top_p: nucleus sampling mass, 0.01-1
            seed: seeds the sampler, 0 to 4294967295
            adapters: empty for the primary adapter at each strength; else loaded adapters' names (see
                /adapters; "base" for the base), comma-separated, each run at each strength: at most 6 panes
                (e.g. "base, step-100, step-400, final" with strengths "1")
            prompt_format: what every pane's model is given, as /compare takes it; null for the profile's
                default (raw for pricer profiles)
        Returns:
            sweep: [{"strength": float, "text": str}, ...], one per strength in the order given; with adapters,
            [{"adapter": name or null, "strength", "label", "text"}, ...], one per pane in order
        """
        values, rows, panes = self._rows(strengths, adapters)
        settings, notices = GenerationSettings.checked(max_new_tokens, temperature, top_p, seed)
        shared = parse_format(prompt_format, default=self.formats.default)
        rows, rendered = self.formats.apply(
            prompt, rows, {row.key: shared for row in rows}, settings.max_new_tokens
        )
        result, _ = self.lens.finished_run(
            prompt, rows, settings, [*notices, *self.formats.warnings(rendered)]
        )
        texts = [result.text(row.key) for row in rows]
        return sweep_json(values, texts) if panes is None else panes_json(panes, texts)

    @user_errors
    def ui_sweep(
        self,
        prompt,
        strengths,
        models,
        pane_text,
        pair_a,
        pair_b,
        fmt,
        system,
        template,
        max_new_tokens,
        temperature,
        top_p,
        seed,
        stop,
    ):
        """Stream every pane; then, from the same GPU call, each pane's price (pricer prompts) and the token
        lens across the panes."""
        lens = self.lens
        n_outputs = 2 * MAX_SWEEP_ROWS + 4 + N_LENS_OUTPUTS + 1
        try:
            shared = self.formats.from_controls(fmt, system, template)
            per_pane = None
            order = ["base", *lens.backend.adapter_names]  # panes in the choices' order, not the clicks'
            chosen = sorted((m for m in (models or []) if m in order), key=order.index)
            if len(lens.info.adapters) < 2 or chosen == lens.backend.adapter_names[:1]:
                chosen = None  # the primary adapter alone: the classic sweep, with the price against strength
            if pane_text and str(pane_text).strip():  # each pane at its own strength
                panes = parse_pane_text(pane_text, lens.backend, shared)
                values, rows = [p.strength for p in panes], pane_rows(panes)
                per_pane = pane_formats(panes, rows, shared)
            else:
                values, rows, panes = self._rows(strengths, chosen)
            settings, notices = GenerationSettings.checked(max_new_tokens, temperature, top_p, seed)
            clean_prompt(prompt)
            rows, rendered, warnings = formatted(
                self.formats, prompt, rows, (fmt, system, template), None, settings.max_new_tokens, per_pane
            )
        except InputError as exc:
            yield unchanged(exc, n_outputs)
            return
        given = given_html(rendered, rows, lens.decode, warnings)
        warn_all(notices)
        event = stop.start() if isinstance(stop, views.StopSignal) else threading.Event()
        is_pricer = pricing.is_task_prompt(prompt, lens.profile.task_prompt)
        pair = _pair(rows, pair_a, pair_b) if lens.has_adapter and len(rows) > 1 else None
        too_long = pair and pane_lens_too_long(lens.backend, prompt, rows, settings.max_new_tokens)
        if too_long:
            pair = None
            gr.Info(
                f"The token lens across the panes is left out: {too_long}. Shorten the prompt or use fewer panes."
            )
        after = After(price_scan=views.PRICE_SCAN if is_pricer else 0, pane_pair=pair)
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
            decode = lambda ids: lens.decode(ids, skip_special_tokens=True)  # noqa: E731
            out.append(divergence_markdown(rows, update.panes, decode) if update.finished else "")
            out += [gr.Column(visible=False) if first else gr.skip(), gr.skip(), gr.skip()]
            out += [gr.Column(visible=False) if first else gr.skip()] + [gr.skip()] * (N_LENS_OUTPUTS - 1)
            out.append(given if first else gr.skip())
            first = False
            yield tuple(out)
        if update is None or afterwards is None or event.is_set():
            return
        prices = (gr.skip(),) * 3
        if afterwards.next_views is not None:
            texts = {key: state.text for key, state in update.panes.items()}
            estimates = lens.price_views(texts, afterwards.next_views, rows)
            truth = pricing.catalog_truth(prompt, lens.profile.task_prompt)
            ordered = [estimates[row.key] for row in rows]
            figure = (
                price_figure(values, ordered, truth)
                if panes is None
                else pane_price_figure([row.label for row in rows], ordered, truth)
            )
            prices = (gr.Column(visible=True), views.price_table_markdown(estimates, truth=truth), figure)
        lensed = (gr.skip(),) * N_LENS_OUTPUTS
        if afterwards.pane_lens is not None:
            lensed = pane_lens_outputs(afterwards.pane_lens)
        yield (gr.skip(),) * (2 * MAX_SWEEP_ROWS + 1) + prices + lensed + (gr.skip(),)


def _pair(rows, a, b) -> tuple[str, str]:
    """The two panes the lens compares token by token: the ones chosen (1-based), else the last and the first."""

    def index(value, default):
        try:
            i = int(value) - 1
        except (TypeError, ValueError):
            return default
        return i if 0 <= i < len(rows) else default

    i, j = index(a, len(rows) - 1), index(b, 0)
    if i == j:
        i, j = len(rows) - 1, 0
    return rows[i].key, rows[j].key


def pane_lens_outputs(pane_lens) -> tuple:
    """The lens section's values: (column, table, the pair's tokens, summary)."""
    from ui.views.lens import lens_html
    from ui.views.pane_lens import pane_lens_frame, pane_lens_summary

    a, b = pane_lens.pair
    labels = pane_lens.labels
    return (
        gr.Column(visible=True),
        pane_lens_frame(pane_lens),
        lens_html(pane_lens.pair_view, labels, (labels[a], labels[b])),
        pane_lens_summary(pane_lens),
    )


def layout(tab: SweepTab, stop: gr.State) -> None:
    lens = tab.lens
    names = lens.backend.adapter_names
    several = len(names) > 1
    gr.Markdown(
        "The same prompt at several adapter strengths"
        + (", and with several adapters (checkpoints, variants)" if several else "")
        + ": every pane one row of ONE batch over the one model. "
        + formula_markdown(lens.adapter_lora if lens.has_adapter else None)
    )
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            prompt = gr.Textbox(label="Prompt", lines=5, max_lines=12, elem_id="lens-sweep-prompt")
            example_prompts(prompt, lens.profile)
        with gr.Column(scale=2, min_width=280):
            models = gr.CheckboxGroup(
                [("Base", "base"), *((name, name) for name in names)],
                value=names[:1],
                label=f"Models: each at each strength (at most {MAX_SWEEP_ROWS} panes)",
                visible=several,
                elem_id="lens-sweep-models",
            )
            strengths = gr.Textbox(
                value=DEFAULT_STRENGTHS if lens.has_adapter else "0",
                label=f"Strengths s (1 to {MAX_SWEEP_ROWS}, from -2 to 3)",
                elem_id="lens-sweep-strengths",
            )
            pane_text = gr.Textbox(
                value="",
                label="Or each pane at its own strength and format (e.g. base@raw, step-100=0.5, final=1.5@chat)",
                visible=several or len(tab.formats.choices()) > 1,
                elem_id="lens-sweep-panes",
            )
            fmt, _, system, template = format_controls(tab.formats, with_base=False)
            with gr.Row(visible=lens.has_adapter):
                choices = [(f"pane {i + 1}", i + 1) for i in range(MAX_SWEEP_ROWS)]
                pair_a = gr.Dropdown(
                    choices, value=None, label="Token lens: colour by pane (default: the last)"
                )
                pair_b = gr.Dropdown(choices, value=None, label="against pane (default: the first)")
            max_new_tokens, temperature, top_p, seed = generation_settings(max_new_tokens=32)
            with gr.Row():
                run_btn = gr.Button("Sweep", variant="primary", elem_id="lens-sweep-run", min_width=120)
                stop_btn = gr.Button("Stop", variant="stop", min_width=80)
    outputs = []
    with gr.Row(equal_height=True):
        for i in range(MAX_SWEEP_ROWS):
            with gr.Column(min_width=220):
                text = gr.Textbox(
                    label=f"Pane {i + 1}",
                    lines=6,
                    max_lines=16,
                    interactive=False,
                    visible=False,
                    elem_id=f"lens-sweep-pane-{i}",
                )
                stats = gr.Markdown(elem_classes=["lens-stats"], elem_id=f"lens-sweep-stats-{i}")
            outputs += [text, stats]
    outputs.append(gr.Markdown(elem_id="lens-sweep-divergence"))
    with gr.Column(visible=False) as price_col:
        gr.Markdown("### The price of each pane")
        with gr.Row():
            with gr.Column(min_width=300):
                price_md = gr.Markdown(elem_id="lens-sweep-prices", elem_classes=TABLE)
            with gr.Column(min_width=300):
                price_plot = gr.Plot(show_label=False, elem_id="lens-sweep-chart")
    outputs += [price_col, price_md, price_plot]
    with gr.Column(visible=False) as lens_col:
        gr.Markdown(
            "### Token lens across the panes\nEvery pane's text scored under every pane's model (teacher-forced, "
            "one batch); the chosen pair token by token."
        )
        lens_table = gr.Dataframe(interactive=False, wrap=True, elem_id="lens-sweep-lens-table")
        lens_tokens = gr.HTML(css_template=LENS_CSS, elem_id="lens-sweep-lens")
        lens_summary = gr.Markdown(elem_id="lens-sweep-lens-summary")
    outputs += [lens_col, lens_table, lens_tokens, lens_summary]
    with gr.Accordion("What each pane was given (the prompt in its format)", open=False):
        outputs.append(gr.HTML(css_template=GIVEN_CSS, elem_id="lens-sweep-given"))
    run = run_btn.click(
        tab.ui_sweep,
        inputs=[
            prompt,
            strengths,
            models,
            pane_text,
            pair_a,
            pair_b,
            fmt,
            system,
            template,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            stop,
        ],  # fmt: skip
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
