"""The Evaluate tab: held-out items of the synthetic catalog through base and fine-tuned (and optionally
several adapter strengths, one batch per chunk), scored and plotted; plus /evaluate."""

import contextlib

import gradio as gr

from ui import views
from ui.common import ON_MODEL, PRIVATE, TABLE, unchanged, user_errors
from ui.lens import Lens
from utils.core import inputs
from utils.core.errors import InputError
from utils.core.inputs import parse_strengths

EVAL_DEFAULT_ITEMS = 20


class EvaluateTab:
    def __init__(self, lens: Lens):
        self.lens = lens

    def _run(self, n_items, strengths="", progress=None):
        from utils.task.catalog import load_split

        lens = self.lens
        n = inputs.check_n_items(n_items)
        if strengths is None or (isinstance(strengths, str) and not strengths.strip()):
            values = []
        else:
            values = parse_strengths(strengths)
        lens.require_pricer("The evaluation")
        if not lens.has_adapter:
            raise InputError(
                "The evaluation compares base and fine-tuned, but no adapter is loaded (base-only)."
            )
        report = None
        with contextlib.closing(lens.evaluation(load_split("test", n), values)) as steps:
            for step in steps:
                if isinstance(step, tuple):
                    if progress is not None:
                        progress(*step)
                else:
                    report = step
        return report, bool(values)

    @user_errors
    def evaluate(self, n_items: int = EVAL_DEFAULT_ITEMS, strengths: str = "") -> dict:
        """Run held-out items of the synthetic catalog through base and fine-tuned and score the prices.

        The catalog is synthetic: descriptions and prices come from a hidden rule with noise, not real products.
        Args:
            n_items: number of test items, 1-200
            strengths: optional adapter strengths to score too (1 to 6 values from -2 to 3, e.g. "0.5, 1.5, 2"),
                all in one batch per chunk; empty for base and fine-tuned only
        Returns:
            evaluation: {"n_items", "seconds", "k", "notice", "metrics": {pane: {method: {"count", "mae",
            "rmsle", "hit_rate", "unparsed"}}}, "items": [{"description", "price", "base", "fine_tuned"}]};
            with strengths also "by_strength": [{"strength", "pane", "metrics": {method: ...}}] by increasing
            strength (base is s = 0, fine_tuned s = 1) and each item's answer under every strength's pane
        """
        from utils.task.catalog import SYNTHETIC_NOTICE

        report, with_strengths = self._run(n_items, strengths)
        return views.eval_json(report, SYNTHETIC_NOTICE, with_strengths)

    @user_errors
    def ui_evaluate(self, n_items, strengths, progress=gr.Progress()):  # noqa: B008 - gradio injects the tracker
        progress(0, desc="Starting the evaluation ...")

        def report_progress(done, total):
            progress((done, total), desc=f"{done} of {total} items scored", unit="items")

        try:
            report, with_strengths = self._run(n_items, strengths, report_progress)
        except InputError as exc:
            return unchanged(exc, 4)
        summary = f"Scored {len(report.items)} items in {report.seconds:.1f} s.\n\n{report.markdown_table()}"
        curve = (
            gr.Plot(value=report.strength_figure("greedy"), visible=True)
            if with_strengths
            else gr.Plot(visible=False)
        )
        return summary, report.figure("greedy"), curve, views.eval_items_frame(report, "greedy")


def layout(tab: EvaluateTab) -> None:
    from utils.task.catalog import SYNTHETIC_NOTICE

    lens = tab.lens
    gr.Markdown(
        f"**{SYNTHETIC_NOTICE}** The items come from the test split, which training never saw. Each item "
        "is priced by base and fine-tuned (and any extra strengths) in one batch."
    )
    can_evaluate = lens.profile.is_pricer and lens.has_adapter
    if not can_evaluate:
        gr.Markdown("Evaluation needs a pricer profile with its adapter loaded; this one cannot run it.")
    with gr.Row():
        n_items = gr.Slider(
            *inputs.N_ITEMS_RANGE,
            value=EVAL_DEFAULT_ITEMS,
            step=1,
            label="Test items",
            min_width=240,
            scale=3,
        )
        strengths = gr.Textbox(
            value="",
            label="Also score these strengths s (optional, e.g. 0.5, 1.5, 2)",
            min_width=240,
            scale=2,
            elem_id="lens-eval-strengths",
        )
        button = gr.Button("Evaluate", variant="primary", interactive=can_evaluate, min_width=120)
    metrics = gr.Markdown(elem_id="lens-eval-metrics", elem_classes=TABLE)
    plot = gr.Plot(label="True vs predicted price (greedy)", show_label=False)
    curve = gr.Plot(label="MAE and hit rate against strength", visible=False, elem_id="lens-eval-curve")
    items = gr.Dataframe(label="Items (greedy predictions)", interactive=False, wrap=True, max_height=420)
    button.click(
        tab.ui_evaluate,
        inputs=[n_items, strengths],
        outputs=[metrics, plot, curve, items],
        **ON_MODEL,
        **PRIVATE,
    )
