"""The Size math tab: the step-by-step adapter size formula for the reference and the loaded base, the
summary and chart, and the loaded adapter counted three ways; plus /size_math."""

import gradio as gr

from ui import views
from ui.common import PRIVATE, TABLE, code, unchanged, user_errors
from ui.lens import Lens
from utils.core import inputs
from utils.core.errors import InputError, LoraLensError
from utils.core.profiles import LLAMA31_PRICER, PRICER_TARGET_MODULES, LoraSettings

REFERENCE_NAME = "Llama-3.1-8B (reference)"


def loaded_name(lens) -> str:
    """The loaded model's name in the size tables: "Loaded: <profile>"."""
    return f"Loaded: {lens.profile.name}"


DEFAULT_TARGETS = ",".join(PRICER_TARGET_MODULES)


class SizeTab:
    def __init__(self, lens: Lens):
        self.lens = lens

    def _size_reports(self, lora: LoraSettings) -> tuple[dict, dict]:
        """(reports, errors) per model (reference, loaded): a target module one model lacks (say GPT-2's
        c_attn on Llama) costs that model its table, not the whole recompute. Raises when none works."""
        from utils.analysis.sizing import size_report

        lens = self.lens
        sources = ([(REFERENCE_NAME, LLAMA31_PRICER.name)] if lens.show_reference else []) + [
            (loaded_name(lens), lens.backend.config)
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
        """(reference step-by-step text, loaded step-by-step text, summary DataFrame, chart) for the tab."""
        from utils.analysis.sizing import format_report

        reports, errors = self._size_reports(lora)
        texts = {name: format_report(rep) for name, rep in reports.items()} | errors
        return (
            texts.get(REFERENCE_NAME, ""),
            texts[loaded_name(self.lens)],
            views.size_summary_frame(reports),
            views.size_chart(reports),
        )

    def cross_checks(self):
        """The loaded adapter counted three ways (formula, peft, file), or None when running base-only."""
        from utils.analysis.sizing import cross_checks

        lens = self.lens
        if not lens.has_adapter:
            return None
        backend = lens.backend
        return cross_checks(backend.loaded_model(), backend.adapter_dir, backend.config, lens.adapter_lora)

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
        from utils.analysis.sizing import formula_lines, report_json

        lora = inputs.parse_lora_inputs(r, alpha, target_modules)
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
    def ui_size_math(self, r, alpha, target_modules):
        try:
            return self.size_views(inputs.parse_lora_inputs(r, alpha, target_modules))
        except InputError as exc:
            return unchanged(exc, 4)


def layout(tab: SizeTab) -> None:
    lens = tab.lens
    gr.Markdown(
        "LoRA adds `r x (in + out)` parameters to every targeted linear layer. Change r, alpha or the "
        "target modules to recompute; the defaults are the lesson's pricer (r = 32, alpha = 64, q/k/v/o), "
        "which gives Llama-3.1-8B 27,262,976 parameters = 109 MB in fp32."
    )
    defaults = LoraSettings(32, 64, 0.1, PRICER_TARGET_MODULES)
    try:
        reference_text, loaded_text, summary, chart = tab.size_views(defaults)
    except LoraLensError:  # a base without q/k/v/o: start from the loaded adapter's own settings
        defaults = lens.adapter_lora
        reference_text, loaded_text, summary, chart = tab.size_views(defaults)
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
        value=summary, label="Summary", interactive=False, wrap=False, elem_id="lens-size-summary"
    )
    plot = gr.Plot(value=chart, label="Base vs adapter, per dtype", show_label=False)
    with gr.Row():
        _, reference = code(
            reference_text,
            f"{REFERENCE_NAME}, step by step",
            "lens-size-reference",
            max_lines=45,
            visible=lens.show_reference,
        )
        _, loaded = code(loaded_text, f"{loaded_name(lens)}, step by step", "lens-size-loaded", max_lines=45)
    gr.Markdown("### The loaded adapter, counted three ways")
    checks = tab.cross_checks()
    if checks is None:
        gr.Markdown("No adapter is loaded (base-only), so there is nothing to cross-check.")
    else:
        gr.Markdown(views.cross_checks_markdown(checks, lens.adapter_lora), elem_classes=TABLE)
        gr.Dataframe(
            value=views.cross_checks_frame(checks),
            interactive=False,
            wrap=True,
            elem_id="lens-cross-checks",
        )
    for trigger in (button.click, targets.submit, r.submit, alpha.submit):
        trigger(
            tab.ui_size_math,
            inputs=[r, alpha, targets],
            outputs=[reference, loaded, table, plot],
            concurrency_limit=2,
            **PRIVATE,
        )
