"""LoRA Lens: what a LoRA / QLoRA fine-tune changes, base and fine-tuned side by side from one 4-bit model.

A thin Gradio layer over utils/: `build_demo(pair_or_engine)` returns the Blocks; the handlers validate their
inputs, call utils, and turn utils' errors into gr.Error. The API endpoints (/compare, /generate,
/estimate_price, /architecture, /size_math, /evaluate) are plain functions registered with gr.api, separate
from the UI's streaming handlers, which are hidden from the API page. The model is loaded once, in the
`__main__` path by `load_models()`, at module level as ZeroGPU requires.
"""

import os

# One OpenMP thread unless the operator says otherwise: generation runs in a worker thread, and a second
# OpenMP pool spinning beside the first halves CPU decode speed (bench/bench_engine.py: 2 threads in a worker
# thread about 2 steps/s, 1 thread about 5). Set before torch loads, which reads it once.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import spaces  # noqa: E402  must come before anything initialises CUDA; a no-op off ZeroGPU

# isort: split
import argparse
import functools
import html
import inspect
import logging
import threading
from contextlib import contextmanager
from dataclasses import replace

import gradio as gr

from utils import views
from utils.engine import (
    BASE,
    FINE_TUNED,
    MAX_NEW_TOKENS_RANGE,
    PANE_LABELS,
    SEED_RANGE,
    TEMPERATURE_RANGE,
    TOP_P_RANGE,
    Engine,
    GenerationSettings,
    clean_prompt,
)
from utils.errors import InputError, LoraLensError
from utils.loading import LoadedPair, load_model_pair
from utils.profiles import LLAMA31_PRICER, PRICER_TARGET_MODULES, PROFILE_CHOICES, LoraSettings, read_settings

log = logging.getLogger("lora_lens")

MODEL = "model"  # concurrency_id of every event that runs the model: one at a time (the engine locks too)
QUEUE_MAX_SIZE = 32  # requests waiting beyond this are told the queue is full
EVAL_DEFAULT_ITEMS = 20
PRICE_TOKENS = 8  # greedy tokens for /estimate_price: "999.99" is six digit-tokens for SmolLM2
REFERENCE_NAME = "Llama-3.1-8B (reference)"
DEFAULT_TARGETS = ",".join(PRICER_TARGET_MODULES)
# What the Compare handler updates, in order: the two pane columns, texts and stats, the divergence, the prices.
COMPARE_OUTPUTS = (
    "base_col", "tuned_col", "base_text", "base_stats", "tuned_text", "tuned_stats", "divergence",
    "price_col", "price_md", "price_plot",
)  # fmt: skip


def load_models(settings=None, profile: str | None = None) -> LoadedPair:
    """The one model the app holds (base + adapter); printed at start so the logs say what is served."""
    settings = settings or read_settings()
    if profile:
        settings = replace(settings, profile=profile)
    print(f"LoRA Lens: loading profile {settings.profile!r} ({settings.precision}) ...", flush=True)
    pair = load_model_pair(settings)
    print(pair.report.as_text(), flush=True)
    return pair


def gpu_seconds(max_new_tokens=64, panes: int = 2) -> int:
    """ZeroGPU reservation for one generation: start-up plus ~10 tokens/s per row, capped at 3 minutes.

    Example: gpu_seconds(64) == 32; gpu_seconds(512) == 122
    """
    try:
        n = min(max(int(max_new_tokens), 1), MAX_NEW_TOKENS_RANGE[1])
    except (TypeError, ValueError):
        n = MAX_NEW_TOKENS_RANGE[1]
    return min(180, 20 + (n * panes) // 10)


def evaluation_seconds(n_items=EVAL_DEFAULT_ITEMS) -> int:
    """ZeroGPU reservation for an evaluation: about half a second per item. Example: evaluation_seconds(20) == 40"""
    try:
        n = min(max(int(n_items), 1), views.N_ITEMS_RANGE[1])
    except (TypeError, ValueError):
        n = views.N_ITEMS_RANGE[1]
    return 30 + n // 2


def _generation_duration(prompt, mode="both", settings=None, stop_event=None) -> int:
    """spaces.GPU's duration for Engine.stream / Engine.run, called with the same arguments as they are."""
    return gpu_seconds(settings.max_new_tokens if settings else 64, 2 if mode == "both" else 1)


def _evaluation_duration(items, progress=None) -> int:
    return evaluation_seconds(len(items))


def _user_message(exc: Exception, where: str) -> gr.Error:
    if isinstance(exc, LoraLensError):
        return gr.Error(html.escape(str(exc), quote=False), print_exception=False)
    log.exception("%s failed", where)
    return gr.Error(
        f"Something went wrong in {where} ({type(exc).__name__}); the details are in the server log. "
        "The model is free again: try once more.",
        print_exception=False,
    )


def _unchanged(exc: InputError, n_outputs: int) -> tuple:
    """A UI input error: say what is wrong in a toast and leave the outputs as they are (no red "Error" badges
    over the last good results). The API endpoints raise gr.Error instead, so clients get an AppError."""
    gr.Warning(html.escape(str(exc), quote=False))
    return (gr.skip(),) * n_outputs


@contextmanager
def _as_gr_error(where: str):
    try:
        yield
    except gr.Error:
        raise
    except Exception as exc:  # every other failure becomes a message, never a stack trace
        raise _user_message(exc, where) from None


def user_errors(fn):
    """Wrap a handler (plain or generator) so users see utils' messages as gr.Error, never a trace."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args, **kwargs):
            with _as_gr_error(fn.__name__):
                yield from fn(*args, **kwargs)

        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with _as_gr_error(fn.__name__):
            return fn(*args, **kwargs)

    return call


class Lens:
    """The app's handlers over one Engine. API methods return plain values; ui_* methods feed components."""

    def __init__(self, pair_or_engine):
        self.engine = pair_or_engine if isinstance(pair_or_engine, Engine) else Engine(pair_or_engine)
        self.pair = self.engine.pair
        self.profile = self.pair.profile
        self.tokenizer = self.engine.tokenizer
        self.config = self.pair.model.config
        self.adapter_lora = views.adapter_lora(self.pair.adapter_dir, self.profile.lora)
        self.loaded_name = f"Loaded: {self.profile.name}"
        self.show_reference = self.profile.name != LLAMA31_PRICER.name
        # On ZeroGPU these run in a GPU worker for a reserved time; elsewhere spaces.GPU returns them unchanged.
        self._stream = spaces.GPU(duration=_generation_duration)(self.engine.stream)
        self._run = spaces.GPU(duration=_generation_duration)(self.engine.run)
        self._next_tokens = spaces.GPU(duration=20)(self.engine.next_token_views)
        self._evaluate_items = spaces.GPU(duration=_evaluation_duration)(self._evaluate_locked)

    # -----------------------------------------------------------------------------------------------
    # Shared pieces

    def _finished_run(self, prompt, mode, settings, notices=()):
        """engine.run with its notices (a clamped setting, a prompt cut to fit the context) shown as warnings."""
        result = self._run(prompt, mode, settings)
        for notice in (*notices, *result.notices):
            gr.Warning(notice)
        return result

    @property
    def has_adapter(self) -> bool:
        return self.engine.has_adapter

    def _require_pricer(self, what: str) -> None:
        if not self.profile.is_pricer:
            raise InputError(
                f"{what} needs a pricer profile (one with a task prompt); {self.profile.name} has none."
            )

    def _both_or_base(self) -> str:
        return "both" if self.has_adapter else "base"

    def _price(self, prompt: str, texts: dict[str, str], mode: str) -> tuple[dict, dict]:
        next_views = self._next_tokens(prompt, mode, views.CHART_TOKENS)
        return next_views, views.price_estimates(texts, next_views, self.tokenizer, views.TOPK)

    def _evaluate_locked(self, items, progress=None):
        from utils.evaluate import evaluate_items

        with self.engine.exclusive():
            return evaluate_items(
                self.pair.model,
                self.tokenizer,
                items,
                batch_size=8,
                progress=progress,
                template=self.profile.task_prompt,
            )

    def _run_evaluation(self, n_items, progress=None):
        from utils.catalog import load_split

        n = views.check_n_items(n_items)
        self._require_pricer("The evaluation")
        if not self.has_adapter:
            raise InputError(
                "The evaluation compares base and fine-tuned, but no adapter is loaded (base-only)."
            )
        return self._evaluate_items(load_split("test", n), progress)

    def _size_reports(self, lora: LoraSettings) -> tuple[dict, dict]:
        """(reports, errors) per model (reference, loaded): a target module one model lacks (say GPT-2's
        c_attn on Llama) costs that model its table, not the whole recompute. Raises when none works."""
        from utils.sizing import size_report

        sources = ([(REFERENCE_NAME, LLAMA31_PRICER.name)] if self.show_reference else []) + [
            (self.loaded_name, self.config)
        ]
        reports, errors = {}, {}
        for name, config in sources:
            try:
                reports[name] = size_report(config, lora)
            except InputError as exc:
                errors[name] = str(exc)
        if not reports:
            raise InputError(next(iter(errors.values())))
        return reports, errors

    def size_views(self, lora: LoraSettings) -> tuple:
        """(reference step-by-step text, loaded step-by-step text, summary DataFrame, chart) for the Size tab."""
        from utils.sizing import format_report

        reports, errors = self._size_reports(lora)
        texts = {name: format_report(rep) for name, rep in reports.items()} | errors
        return (
            texts.get(REFERENCE_NAME, ""),
            texts[self.loaded_name],
            views.size_summary_frame(reports),
            views.size_chart(reports),
        )

    def loaded_views(self):
        from utils.architecture import architecture_views

        if not hasattr(self, "_loaded_views"):
            self._loaded_views = architecture_views(None, self.pair.model)
        return self._loaded_views

    def cross_checks(self):
        """The loaded adapter counted three ways (formula, peft, file), or None when running base-only."""
        from utils.sizing import cross_checks

        if not self.has_adapter:
            return None
        return cross_checks(self.pair.model, self.pair.adapter_dir, self.config, self.adapter_lora)

    # -----------------------------------------------------------------------------------------------
    # API endpoints (gr.api): plain functions, named parameters, JSON-ready results

    @user_errors
    def compare(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> tuple[str, str]:
        """Generate from the same prompt with the adapter detached (base) and attached (fine-tuned), in one batch.

        Args:
            prompt: the text to continue; for the pricer, a prompt ending in "Price is $" (see /estimate_price)
            max_new_tokens: tokens per pane, 1-512 (larger values are clamped)
            temperature: 0 for greedy decoding (deterministic), up to 2 to sample
            top_p: nucleus sampling mass, 0.01-1
            seed: seeds the sampler, 0 to 4294967295, so a sampled run can be repeated
        Returns:
            base_text: the continuation of the base model (adapter detached)
            fine_tuned_text: the continuation of the fine-tuned model (adapter attached)
        """
        settings, notices = GenerationSettings.checked(max_new_tokens, temperature, top_p, seed)
        if not self.has_adapter:
            raise InputError(
                "No adapter is loaded (base-only), so there is nothing to compare: use /generate."
            )
        result = self._finished_run(prompt, "both", settings, notices)
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
    ) -> str:
        """Generate one continuation, with the LoRA adapter attached (fine-tuned) or detached (base).

        Args:
            prompt: the text to continue
            use_adapter: true for the fine-tuned model, false for the base
            max_new_tokens: tokens to generate, 1-512 (larger values are clamped)
            temperature: 0 for greedy decoding (deterministic), up to 2 to sample
            top_p: nucleus sampling mass, 0.01-1
            seed: seeds the sampler, 0 to 4294967295
        Returns:
            text: the generated continuation (without the prompt)
        """
        use_adapter = views.check_flag("use_adapter", use_adapter)
        settings, notices = GenerationSettings.checked(max_new_tokens, temperature, top_p, seed)
        if use_adapter and not self.has_adapter:
            raise InputError("No adapter is loaded (base-only): call /generate with use_adapter=false.")
        mode = "fine_tuned" if use_adapter else "base"
        result = self._finished_run(prompt, mode, settings, notices)
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
        from utils.pricing import build_prompt

        self._require_pricer("Price estimates")
        prompt = build_prompt(description, self.profile.task_prompt)
        mode = self._both_or_base()
        result = self._run(prompt, mode, GenerationSettings(max_new_tokens=PRICE_TOKENS))
        texts = {key: pane.text for key, pane in result.panes.items()}
        _, estimates = self._price(prompt, texts, mode)
        return {"prompt": prompt, "k": views.TOPK, "panes": estimates}

    @user_errors
    def architecture(self) -> dict:
        """The loaded model's printouts: the base as loaded, the PEFT model, and the diff marking the adapter.

        Returns:
            architecture: {"loaded": {"base", "peft", "diff", "added_lines"}, "reference": the same for
            Llama-3.1-8B + the pricer LoRA built on the meta device (null when that is the loaded model)}
        """
        from utils.architecture import reference_views

        reference = views.architecture_json(reference_views()) if self.show_reference else None
        return {"loaded": views.architecture_json(self.loaded_views()), "reference": reference}

    @user_errors
    def size_math(self, r: int = 32, alpha: float = 64, target_modules: str = DEFAULT_TARGETS) -> dict:
        """LoRA size math for these settings on the reference Llama-3.1-8B and on the loaded base.

        Args:
            r: LoRA rank, 1-1024
            alpha: LoRA alpha (the update is scaled by alpha / r), greater than 0
            target_modules: comma-separated linear layer names (e.g. "q_proj,v_proj"), or "all-linear"
        Returns:
            size_math: {"lora", "reports": {model: every number of the step-by-step table},
            "formula_lines": {model: [lines]}, "errors": {model: why it has no table (a target module it
            lacks)}, "cross_checks": the loaded adapter counted three ways
            (formula, peft, file) with its own settings, or null when running base-only}
        """
        from utils.sizing import formula_lines, report_json

        lora = views.parse_lora_inputs(r, alpha, target_modules)
        reports, errors = self._size_reports(lora)
        checks = self.cross_checks()
        return {
            "lora": {"r": lora.r, "alpha": lora.alpha, "target_modules": list(lora.target_modules)},
            "reports": {name: report_json(rep) for name, rep in reports.items()},
            "formula_lines": {name: formula_lines(rep.adapter) for name, rep in reports.items()},
            "errors": errors,
            "cross_checks": views.cross_checks_json(checks) if checks is not None else None,
        }

    @user_errors
    def evaluate(self, n_items: int = EVAL_DEFAULT_ITEMS) -> dict:
        """Run held-out items of the synthetic catalog through base and fine-tuned and score the prices.

        The catalog is synthetic: descriptions and prices come from a hidden rule with noise, not real products.
        Args:
            n_items: number of test items, 1-200
        Returns:
            evaluation: {"n_items", "seconds", "k", "notice", "metrics": {pane: {method: {"count", "mae",
            "rmsle", "hit_rate", "unparsed"}}}, "items": [{"description", "price", "base", "fine_tuned"}]}
        """
        from utils.catalog import SYNTHETIC_NOTICE

        return views.eval_json(self._run_evaluation(n_items), SYNTHETIC_NOTICE)

    # -----------------------------------------------------------------------------------------------
    # UI handlers (hidden from the API page)

    def _compare_outputs(self, update, panes, finished, first):
        """Values for the compare outputs (COMPARE_OUTPUTS): column visibility (first update only), texts, stats, divergence."""
        skip = gr.skip()
        out = [
            gr.Column(visible=BASE in panes) if first else skip,
            gr.Column(visible=FINE_TUNED in panes) if first else skip,
        ]
        for key in (BASE, FINE_TUNED):
            pane = update.panes.get(key) if update is not None else None
            out += [pane.text if pane else "", views.pane_stats(pane)]
        if update is not None and len(panes) == 2:
            decode = functools.partial(self.tokenizer.decode, skip_special_tokens=True)
            out.append(views.divergence_html(update.panes[BASE], update.panes[FINE_TUNED], decode, finished))
        else:
            out.append("")
        out += [gr.Column(visible=False) if first else skip, skip, skip]
        return tuple(out)

    @user_errors
    def ui_compare(self, prompt, mode, max_new_tokens, temperature, top_p, seed, stop):
        """Stream both panes token by token; then, for a pricer prompt, the prices and the next-token chart."""
        try:
            settings, notices = GenerationSettings.checked(max_new_tokens, temperature, top_p, seed)
            panes = self.engine.panes_for(mode)
            clean_prompt(prompt)
        except InputError as exc:
            yield _unchanged(exc, len(COMPARE_OUTPUTS))
            return
        for notice in notices:
            gr.Warning(notice)
        event = stop.start() if isinstance(stop, views.StopSignal) else threading.Event()
        update, first = None, True
        for update in self._stream(prompt, mode, settings, event):
            if first:
                for notice in update.notices:
                    gr.Info(notice)
            yield self._compare_outputs(update, panes, update.finished, first)
            first = False
        if update is None or event.is_set() or not views.is_task_prompt(prompt, self.profile.task_prompt):
            return
        texts = {key: pane.text for key, pane in update.panes.items()}
        next_views, estimates = self._price(prompt, texts, self._both_or_base())
        figure = views.next_token_figure(views.next_token_frame(next_views))
        skip = gr.skip()
        yield (skip,) * 7 + (gr.Column(visible=True), views.price_table_markdown(estimates), figure)

    @staticmethod
    def ui_stop(stop):
        if isinstance(stop, views.StopSignal):
            stop.stop()

    @staticmethod
    def ui_mode(mode):
        """The adapter toggle follows the pane choice: fixed in 'both', attached for the fine-tuned pane."""
        return gr.Checkbox(value=mode != "base", interactive=mode != "both")

    @staticmethod
    def ui_toggle(attached, mode):
        """Attaching or detaching the adapter in single-pane mode switches between the two panes."""
        if mode == "both":
            return gr.skip()
        return "fine_tuned" if attached else "base"

    @user_errors
    def ui_wrap(self, prompt):
        """Put a bare product description into the pricer's task prompt."""
        from utils.pricing import build_prompt

        self._require_pricer("Wrapping a description")
        if views.is_task_prompt(prompt, self.profile.task_prompt):
            return prompt
        return build_prompt(prompt, self.profile.task_prompt)

    @user_errors
    def ui_reference_architecture(self):
        """The reference pair's printouts, built on the meta device (a second or two, then cached)."""
        from utils.architecture import reference_views

        ref = reference_views()
        note = (
            f"Built from configs/llama-3.1-8b on the meta device (no weights, no memory): NF4 layers in place, "
            f"LoRA r = 32 on q/k/v/o. The adapter added {ref.added_lines} lines."
        )
        return ref.base_text, ref.diff_text, note

    @user_errors
    def ui_size_math(self, r, alpha, target_modules):
        try:
            return self.size_views(views.parse_lora_inputs(r, alpha, target_modules))
        except InputError as exc:
            return _unchanged(exc, 4)

    @user_errors
    def ui_evaluate(self, n_items, progress=gr.Progress()):  # noqa: B008 - gradio injects the tracker
        progress(0, desc="Starting the evaluation ...")

        def report_progress(done, total):
            progress((done, total), desc=f"{done} of {total} items scored", unit="items")

        try:
            report = self._run_evaluation(n_items, report_progress)
        except InputError as exc:
            return _unchanged(exc, 3)
        summary = f"Scored {len(report.items)} items in {report.seconds:.1f} s.\n\n{report.markdown_table()}"
        return summary, report.figure("greedy"), views.eval_items_frame(report, "greedy")


# ---------------------------------------------------------------------------------------------------
# Layout


def theme():
    """Gradio's Soft theme with system fonts: no font downloads, so it renders the same offline."""
    return gr.themes.Soft(
        primary_hue="indigo",
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
    ).set(
        button_primary_background_fill="*primary_600",  # white on indigo-600: readable, unlike Soft's default
        button_primary_background_fill_hover="*primary_700",
        button_primary_text_color="white",
    )


CSS = """
.lens-stats { font-size: 0.85em; color: var(--body-text-color-subdued); min-height: 1.4em; }
.lens-stats p { margin: 0; }
.lens-code-col { overflow: hidden; }
.lens-code-col .cm-editor { max-width: 100%; }
"""


def launch(demo: gr.Blocks, **kwargs):
    """demo.launch() with the app's theme and error settings; kwargs (server_name, server_port ...) pass on.

    show_error=False: unexpected exceptions show a generic message; utils' messages arrive as gr.Error.
    """
    options = dict(theme=theme(), css=CSS, show_error=False, footer_links=["api", "gradio", "settings"])
    options.update(kwargs)
    return demo.launch(**options)


def _mode_choices(has_adapter: bool):
    if not has_adapter:
        return [("Base only (no adapter loaded)", "base")]
    return [
        ("Both, side by side", "both"),
        ("Base only (adapter detached)", "base"),
        ("Fine-tuned only (adapter attached)", "fine_tuned"),
    ]


PRIVATE = dict(api_visibility="private")  # UI handlers: not on the API page, not callable by clients
ON_MODEL = dict(concurrency_id=MODEL, concurrency_limit=1)


def _pane(key: str, visible: bool = True):
    """One output pane: its text (streamed) and the stats line under it, in a column that wraps on phones."""
    name = "base" if key == BASE else "tuned"
    with gr.Column(min_width=300, visible=visible) as column:
        text = gr.Textbox(
            label=PANE_LABELS[key],
            lines=8,
            max_lines=20,
            interactive=False,
            buttons=["copy"],
            elem_id=f"lens-pane-{name}",
        )
        stats = gr.Markdown(elem_classes=["lens-stats"], elem_id=f"lens-stats-{name}")
    return column, text, stats


def _code(
    value, label: str, elem_id: str, language=None, wrap: bool = False, max_lines: int = 40, visible=True
):
    """A read-only printout in a column that scrolls sideways instead of widening the page."""
    with gr.Column(min_width=320, elem_classes=["lens-code-col"], visible=visible) as column:
        code = gr.Code(
            value,
            language=language,
            label=label,
            max_lines=max_lines,
            show_line_numbers=False,
            wrap_lines=wrap,
            elem_id=elem_id,
        )
    return column, code


def _compare_tab(lens: Lens, stop: gr.State) -> None:
    profile = lens.profile
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            prompt = gr.Textbox(
                label="Prompt",
                lines=6,
                max_lines=14,
                placeholder="A product description in the pricer prompt, or any text to continue.",
                elem_id="lens-prompt",
            )
            examples = views.example_prompts(profile)
            gr.Examples(
                examples=[[p] for _, p in examples],
                inputs=[prompt],
                example_labels=[label for label, _ in examples],
                label="Examples (catalog items are synthetic, from the test split)",
                **PRIVATE,
            )
        with gr.Column(scale=2, min_width=280):
            mode = gr.Radio(
                _mode_choices(lens.has_adapter), value="both" if lens.has_adapter else "base", label="Panes"
            )
            attached = gr.Checkbox(
                value=lens.has_adapter,
                interactive=False,
                label="Adapter attached",
                info="In single-pane mode, attach (fine-tuned) or detach (base) the LoRA adapter.",
            )
            with gr.Accordion("Generation settings", open=False):
                max_new_tokens = gr.Slider(*MAX_NEW_TOKENS_RANGE, value=64, step=1, label="Max new tokens")
                temperature = gr.Slider(
                    *TEMPERATURE_RANGE, value=0.0, step=0.05, label="Temperature (0 = greedy)"
                )
                top_p = gr.Slider(*TOP_P_RANGE, value=1.0, step=0.01, label="Top-p")
                seed = gr.Number(value=0, precision=0, label=f"Seed (0 to {SEED_RANGE[1]})")
            with gr.Row():
                run_btn = gr.Button("Compare", variant="primary", elem_id="lens-run", min_width=120)
                stop_btn = gr.Button("Stop", variant="stop", elem_id="lens-stop", min_width=80)
            wrap_btn = gr.Button(
                "Wrap a description in the pricer prompt", size="sm", visible=profile.is_pricer
            )
    with gr.Row(equal_height=True):
        base_col, base_text, base_stats = _pane(BASE)
        tuned_col, tuned_text, tuned_stats = _pane(FINE_TUNED, visible=lens.has_adapter)
    divergence = gr.HTML(css_template=views.DIVERGENCE_CSS, elem_id="lens-divergence")
    with gr.Column(visible=False) as price_col:
        gr.Markdown("### The price, read two ways")
        with gr.Row():
            with gr.Column(min_width=300):
                price_md = gr.Markdown(elem_id="lens-prices")
            with gr.Column(min_width=300):
                price_plot = gr.Plot(
                    label="Next-token probabilities", show_label=False, elem_id="lens-next-token"
                )

    outputs = [base_col, tuned_col, base_text, base_stats, tuned_text, tuned_stats, divergence]
    outputs += [price_col, price_md, price_plot]  # in the order of COMPARE_OUTPUTS
    run = run_btn.click(
        lens.ui_compare,
        inputs=[prompt, mode, max_new_tokens, temperature, top_p, seed, stop],
        outputs=outputs,
        show_progress="minimal",
        **ON_MODEL,
        **PRIVATE,
    )
    # Stop sets the run's event at once (not queued) and also cancels the event, should it still be queued.
    stop_btn.click(lens.ui_stop, inputs=[stop], outputs=None, queue=False, cancels=[run], **PRIVATE)
    mode.input(lens.ui_mode, inputs=[mode], outputs=[attached], queue=False, **PRIVATE)
    attached.input(lens.ui_toggle, inputs=[attached, mode], outputs=[mode], queue=False, **PRIVATE)
    wrap_btn.click(lens.ui_wrap, inputs=[prompt], outputs=[prompt], queue=False, **PRIVATE)


def _architecture_tab(lens: Lens) -> None:
    loaded = lens.loaded_views()
    gr.Markdown(
        "The printout of the loaded model, without and with the adapter. On the right, `+` marks every line "
        f"the adapter added ({loaded.added_lines} here); `lora_A` / `lora_B` carry their shapes and parameter "
        "counts. Repeated decoder layers are folded (`(0-29): 30 x ...`)."
    )
    with gr.Row():
        _code(loaded.base_text, "Base as loaded (adapter detached)", "lens-arch-base")
        _code(
            loaded.diff_text, "PEFT model (+ = added by the adapter)", "lens-arch-peft", "python", wrap=True
        )
    if not lens.show_reference:
        return
    gr.Markdown("### Reference: Llama-3.1-8B with the pricer LoRA (r = 32, q/k/v/o)")
    try:
        base_text, diff_text, note = lens.ui_reference_architecture()
    except gr.Error as exc:  # a broken reference config must not stop the app
        gr.Markdown(f"The reference could not be built: {exc.message}")
        return
    gr.Markdown(note)
    with gr.Row():
        _code(base_text, "Llama-3.1-8B in NF4", "lens-ref-base")
        _code(diff_text, "Llama-3.1-8B + LoRA (PEFT)", "lens-ref-peft", "python", wrap=True)


def _size_tab(lens: Lens) -> None:
    gr.Markdown(
        "LoRA adds `r x (in + out)` parameters to every targeted linear layer. Change r, alpha or the target "
        "modules to recompute; the defaults are the lesson's pricer (r = 32, alpha = 64, q/k/v/o), which gives "
        "Llama-3.1-8B 27,262,976 parameters = 109 MB in fp32."
    )
    defaults = LoraSettings(32, 64, 0.1, PRICER_TARGET_MODULES)
    try:
        reference_text, loaded_text, summary, chart = lens.size_views(defaults)
    except LoraLensError:  # a base without q/k/v/o: start from the loaded adapter's own settings
        defaults = lens.adapter_lora
        reference_text, loaded_text, summary, chart = lens.size_views(defaults)
    with gr.Row():
        r = gr.Number(value=defaults.r, precision=0, label="r (rank)", min_width=120)
        alpha = gr.Number(value=defaults.alpha, label="alpha", min_width=120)
        targets = gr.Textbox(
            value=",".join(defaults.target_modules),
            label="Target modules (comma-separated, or all-linear)",
            min_width=260,
            scale=3,
        )
        button = gr.Button("Recompute", min_width=120, scale=0)
    table = gr.Dataframe(
        value=summary, label="Summary", interactive=False, wrap=True, elem_id="lens-size-summary"
    )
    plot = gr.Plot(value=chart, label="Base vs adapter, per dtype", show_label=False)
    with gr.Row():
        _, reference = _code(
            reference_text,
            f"{REFERENCE_NAME}, step by step",
            "lens-size-reference",
            max_lines=45,
            visible=lens.show_reference,
        )
        _, loaded = _code(loaded_text, f"{lens.loaded_name}, step by step", "lens-size-loaded", max_lines=45)
    gr.Markdown("### The loaded adapter, counted three ways")
    checks = lens.cross_checks()
    if checks is None:
        gr.Markdown("No adapter is loaded (base-only), so there is nothing to cross-check.")
    else:
        gr.Markdown(views.cross_checks_markdown(checks, lens.adapter_lora))
        gr.Dataframe(
            value=views.cross_checks_frame(checks), interactive=False, wrap=True, elem_id="lens-cross-checks"
        )
    for trigger in (button.click, targets.submit, r.submit, alpha.submit):
        trigger(
            lens.ui_size_math,
            inputs=[r, alpha, targets],
            outputs=[reference, loaded, table, plot],
            concurrency_limit=2,
            **PRIVATE,
        )


def _evaluate_tab(lens: Lens) -> None:
    from utils.catalog import SYNTHETIC_NOTICE

    gr.Markdown(
        f"**{SYNTHETIC_NOTICE}** The items come from the test split, which training never saw. Each item is "
        "priced by base and fine-tuned in one mixed batch."
    )
    can_evaluate = lens.profile.is_pricer and lens.has_adapter
    if not can_evaluate:
        gr.Markdown("Evaluation needs a pricer profile with its adapter loaded; this one cannot run it.")
    with gr.Row():
        n_items = gr.Slider(
            *views.N_ITEMS_RANGE, value=EVAL_DEFAULT_ITEMS, step=1, label="Test items", min_width=240, scale=3
        )
        button = gr.Button("Evaluate", variant="primary", interactive=can_evaluate, min_width=120)
    metrics = gr.Markdown(elem_id="lens-eval-metrics")
    plot = gr.Plot(label="True vs predicted price (greedy)", show_label=False)
    items = gr.Dataframe(
        label="Items (greedy predictions)",
        interactive=False,
        wrap=True,
        max_height=420,
        column_widths=["58%", "14%", "14%", "14%"],
    )
    button.click(lens.ui_evaluate, inputs=[n_items], outputs=[metrics, plot, items], **ON_MODEL, **PRIVATE)


def _api(lens: Lens) -> None:
    """The named endpoints for gradio_client and the "Use via API" page: plain functions, not the UI's.

    The page shows each function's whole docstring (parameters and return shape included).
    """

    def endpoint(fn, name, **kwargs):
        gr.api(fn, api_name=name, api_description=inspect.getdoc(fn), **kwargs)

    endpoint(lens.compare, "compare", **ON_MODEL)
    endpoint(lens.generate, "generate", **ON_MODEL)
    endpoint(lens.estimate_price, "estimate_price", **ON_MODEL)
    endpoint(lens.architecture, "architecture", concurrency_id="meta", concurrency_limit=1)
    endpoint(lens.size_math, "size_math", concurrency_limit=2)
    endpoint(lens.evaluate, "evaluate", **ON_MODEL)


def build_demo(pair_or_engine) -> gr.Blocks:
    """The whole app for one loaded pair (or an Engine over it): header, four tabs, and the API endpoints.

    Launch it with `launch(demo, ...)` (the app's theme and error settings) or demo.launch(...).
    """
    lens = Lens(pair_or_engine)
    with gr.Blocks(title="LoRA Lens", analytics_enabled=False) as demo:
        stop = gr.State(views.StopSignal())
        gr.HTML(
            views.header_html(lens.pair.report, lens.profile),
            css_template=views.HEADER_CSS,
            elem_id="lens-header",
        )
        with gr.Tabs():
            with gr.Tab("Compare", id="compare"):
                _compare_tab(lens, stop)
            with gr.Tab("Architecture", id="architecture"):
                _architecture_tab(lens)
            with gr.Tab("Size math", id="size"):
                _size_tab(lens)
            with gr.Tab("Evaluate", id="evaluate"):
                _evaluate_tab(lens)
        _api(lens)
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=2)
    return demo


def create_app(settings=None, profile: str | None = None) -> gr.Blocks:
    """load_models() + build_demo(): the app as `python app.py` serves it."""
    return build_demo(load_models(settings, profile))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Launch LoRA Lens.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to serve a network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--profile", choices=PROFILE_CHOICES, help="overrides LORA_LENS_PROFILE")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    logging.basicConfig(level=logging.INFO)
    PAIR = load_models(
        profile=args.profile
    )  # module level: ZeroGPU places the model before the server starts
    launch(build_demo(PAIR), server_name=args.host, server_port=args.port, share=args.share)
