"""The Evaluate tab: held-out items of the synthetic catalog through base and fine-tuned (and optionally
several adapter strengths, one batch per chunk), scored and plotted, for pricer profiles; your own JSONL / CSV
of prompts and reference answers through both, for any profile with an adapter; plus /evaluate and
/evaluate_data."""

import contextlib
import inspect
import os
from pathlib import Path

import gradio as gr

from ui import views
from ui.common import ON_MODEL, PRIVATE, TABLE, report_of, unchanged, user_errors
from ui.lens import Lens
from ui.views.reports import EVAL_PANES
from utils.core import inputs
from utils.core.errors import InputError
from utils.core.inputs import parse_strengths
from utils.core.panes import other_adapters

EVAL_DEFAULT_ITEMS = 20
OWN_DATA_TOKENS = (1, 256)  # greedy tokens per answer on your own data
OWN_DATA_DEFAULT_TOKENS = 32


class EvaluateTab:
    def __init__(self, lens: Lens):
        self.lens = lens

    def _adapters(self, adapters) -> list[str]:
        return other_adapters(adapters, self.lens.backend)

    def _run(self, n_items, strengths="", progress=None, adapters=""):
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
        names = self._adapters(adapters)
        report = report_of(lens.evaluation(load_split("test", n), values, names), progress)
        return report, bool(values)

    @user_errors
    def evaluate(self, n_items: int = EVAL_DEFAULT_ITEMS, strengths: str = "", adapters: str = "") -> dict:
        """Run held-out items of the synthetic catalog through base and fine-tuned and score the prices.

        The catalog is synthetic: descriptions and prices come from a hidden rule with noise, not real products.
        Args:
            n_items: number of test items, 1-200
            strengths: optional adapter strengths to score too (1 to 6 values from -2 to 3, e.g. "0.5, 1.5, 2"),
                all in one batch per chunk; empty for base and fine-tuned only
            adapters: optional loaded adapters to score too, each at s = 1 (see /adapters), comma-separated
                (e.g. "step-100, step-400"), all in the same batches
        Returns:
            evaluation: {"n_items", "seconds", "k", "notice", "metrics": {pane: {method: {"count", "mae",
            "rmsle", "hit_rate", "unparsed"}}}, "items": [{"description", "price", "base", "fine_tuned"}]};
            with strengths also "by_strength": [{"strength", "pane", "metrics": {method: ...}}] by increasing
            strength (base is s = 0, fine_tuned s = 1) and each item's answer under every strength's pane; with
            adapters, their panes (keyed by name) in "metrics" and each item, and "flips": [{"a", "b",
            "right_a_wrong_b": [item index], "right_b_wrong_a": [...]}] for every two panes (greedy prices)
        """
        from utils.task.catalog import SYNTHETIC_NOTICE

        report, with_strengths = self._run(n_items, strengths, adapters=adapters)
        out = views.eval_json(report, SYNTHETIC_NOTICE, with_strengths)
        if self._adapters(adapters):
            out["flips"] = eval_flips(report)
        return out

    @user_errors
    def ui_evaluate(self, n_items, strengths, adapters=None, progress=gr.Progress()):  # noqa: B008 - gradio injects the tracker
        progress(0, desc="Starting the evaluation ...")

        def report_progress(done, total):
            progress((done, total), desc=f"{done} of {total} items scored", unit="items")

        try:
            report, with_strengths = self._run(n_items, strengths, report_progress, adapters or [])
        except InputError as exc:
            return unchanged(exc, 6)
        summary = f"Scored {len(report.items)} items in {report.seconds:.1f} s.\n\n{report.markdown_table()}"
        curve = (
            gr.Plot(value=report.strength_figure("greedy"), visible=True)
            if with_strengths
            else gr.Plot(visible=False)
        )
        several = bool(self._adapters(adapters or []))
        chart = gr.Plot(value=adapter_figure(report), visible=True) if several else gr.Plot(visible=False)
        flips = (
            gr.Dataframe(value=flips_frame(report), visible=True) if several else gr.Dataframe(visible=False)
        )
        items = views.eval_items_frame(report, "greedy")
        return summary, report.figure("greedy"), curve, chart, flips, items

    def _run_own_data(self, file, max_new_tokens, progress=None):
        """Read and check the upload here (before any GPU call), delete it, then score it through both models."""
        from utils.task.own_data import parse_examples

        n = inputs.parse_number("max_new_tokens", max_new_tokens, integer=True)
        inputs.require_range("max_new_tokens", n, OWN_DATA_TOKENS)
        examples = parse_examples(_read_upload(file), Path(str(file)).name if file else "")
        if not self.lens.has_adapter:
            raise InputError(
                "Evaluating your data compares base and fine-tune, but no adapter is loaded (base-only)."
            )
        return report_of(self.lens.evaluation_data(examples, n), progress)

    @user_errors
    def evaluate_data(self, file: str, max_new_tokens: int = OWN_DATA_DEFAULT_TOKENS) -> dict:
        """Your own examples through base and fine-tuned: greedy answers, matches, and the reference's probability.

        The file is parsed as JSONL or CSV text only (never run), at most 1 MB and 200 examples, and deleted once
        read. Works for any task: the price views are not needed.
        Args:
            file: a JSONL file with one {"prompt": ..., "answer": ...} object per line, or a CSV file whose header
                names the columns prompt and answer (gradio_client: handle_file("data.jsonl"))
            max_new_tokens: greedy tokens per answer, 1-256
        Returns:
            evaluation: {"n_items", "seconds", "max_new_tokens", "totals": {"base" | "fine_tuned": {"exact_match",
            "contains", "mean_logprob_answer", "logprob_per_answer_token"}}, "flips": {"fixed": [item index],
            "broken": [...]}, "items": [{"prompt", "answer", "answer_tokens", "logprob_gain", "base" |
            "fine_tuned": {"text", "exact", "contains", "logprob_answer"}}]}. Matches fold case and white space;
            logprob_answer is log p(reference | prompt) in nats, teacher-forced; logprob_gain is fine_tuned's
            minus base's; "fixed" items contain the reference in the fine-tune's answer and not in the base's
        """
        return views.own_data_json(self._run_own_data(file, max_new_tokens))

    @user_errors
    def ui_evaluate_data(self, file, max_new_tokens, progress=gr.Progress()):  # noqa: B008 - gradio injects it
        progress(0, desc="Reading your data ...")

        def report_progress(done, total):
            progress((done, total), desc=f"{done} of {total} examples scored", unit="examples")

        try:
            report = self._run_own_data(file, max_new_tokens, report_progress)
        except InputError as exc:
            return unchanged(exc, 2)
        return views.own_data_markdown(report), views.own_data_frame(report)


def eval_flips(report, method: str = "greedy") -> list[dict]:
    """For every two panes, the items right (a hit) under one and wrong under the other, by index."""
    from utils.task.pricing import is_hit

    panes = list(report.metrics)
    hits = {
        p: [is_hit(item.truth, item.panes[p].predictions[method]) for item in report.items] for p in panes
    }
    out = []
    for i, a in enumerate(panes):
        for b in panes[i + 1 :]:
            pairs = list(enumerate(zip(hits[a], hits[b], strict=True)))
            out.append(
                {
                    "a": EVAL_PANES.get(a, a),
                    "b": EVAL_PANES.get(b, b),
                    "right_a_wrong_b": [n for n, (x, y) in pairs if x and not y],
                    "right_b_wrong_a": [n for n, (x, y) in pairs if y and not x],
                }
            )
    return out


def flips_frame(report):
    """One row per item that flips between two panes: which two, the item and both prices; a row opens the item
    in Compare."""
    import pandas as pd

    rows = []
    for flip in eval_flips(report):
        a, b = flip["a"], flip["b"]
        for key, right, wrong in (("right_a_wrong_b", a, b), ("right_b_wrong_a", b, a)):
            for index in flip[key]:
                item = report.items[index]
                pane = {EVAL_PANES.get(p, p): p for p in item.panes}
                rows.append(
                    {
                        "description": item.description,
                        "price": round(item.truth, 2),
                        "right under": right,
                        "wrong under": wrong,
                        f"price, {right}": item.panes[pane[right]].predictions["greedy"],
                        f"price, {wrong}": item.panes[pane[wrong]].predictions["greedy"],
                    }
                )
    if not rows:
        return pd.DataFrame([{"description": "No item flips between any two panes."}])
    return pd.DataFrame(rows)


def adapter_figure(report):
    """MAE and hit rate of every pane (base, fine-tuned, strengths, adapters), side by side (greedy prices)."""
    from matplotlib.figure import Figure

    panes = list(report.metrics)
    metrics = [report.metrics[p]["greedy"] for p in panes]
    figure = Figure(figsize=(max(6.0, 1.3 * len(panes)), 3.8), layout="constrained")
    mae_axis, hit_axis = figure.subplots(1, 2)
    mae_axis.bar(
        range(len(panes)), [m.mae if m.mae is not None else float("nan") for m in metrics], color="#4f46e5"
    )
    mae_axis.set_title("MAE (\\$, lower is better)")
    hit_axis.bar(range(len(panes)), [100 * m.hit_rate for m in metrics], color="#d97706")
    hit_axis.set_title("hit rate (%)")
    hit_axis.set_ylim(0, 100)
    for axis in (mae_axis, hit_axis):
        axis.set_xticks(range(len(panes)), panes, fontsize=8, rotation=20)
        axis.grid(True, axis="y", alpha=0.2)
    return figure


def _read_upload(file) -> bytes:
    """The uploaded file's bytes, read once and the upload deleted: nothing a visitor sends is kept."""
    from utils.task.own_data import MAX_FILE_BYTES

    if not file:
        raise InputError("Choose a JSONL or CSV file of prompts and answers first.")
    path = Path(str(file)).resolve()
    # gradio hands over only files uploaded into its own folder; this guard keeps it so, since the file is deleted
    if not path.is_relative_to(Path(gr.utils.get_upload_folder()).resolve()):
        raise InputError("Upload the file with the file picker (or gradio_client's handle_file).")
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError:
        raise InputError("The uploaded file could not be read; upload it again.") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
    return data


def layout(tab: EvaluateTab):
    """Two sections: the synthetic catalog (pricer profiles) and your own data (any profile with an adapter).
    Returns the table of items that flip between two adapters (a row opens its item in Compare), or None."""
    flips = None
    if tab.lens.profile.is_pricer:
        flips = _catalog_layout(tab)
    else:
        gr.Markdown(
            "The catalog evaluation scores prices and needs a pricer profile (a task prompt, "
            "`LORA_LENS_TASK_PROMPT`); your own data below works for any task."
        )
    _own_data_layout(tab)
    return flips


def _catalog_layout(tab: EvaluateTab) -> None:
    from utils.task.catalog import SYNTHETIC_NOTICE

    lens = tab.lens
    gr.Markdown(
        f"### The synthetic catalog\n\n**{SYNTHETIC_NOTICE}** The items come from the test split, which training "
        "never saw. Each item is priced by base and fine-tuned (and any extra strengths) in one batch."
    )
    can_evaluate = lens.has_adapter
    if not can_evaluate:
        gr.Markdown("Evaluation compares base and fine-tuned; no adapter is loaded, so it cannot run.")
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
    others = lens.backend.adapter_names[1:]
    adapters = gr.CheckboxGroup(
        others,
        value=[],
        label="Also score these adapters (each at s = 1, in the same batches)",
        visible=bool(others),
        elem_id="lens-eval-adapters",
    )
    metrics = gr.Markdown(elem_id="lens-eval-metrics", elem_classes=TABLE)
    plot = gr.Plot(label="True vs predicted price (greedy)", show_label=False)
    curve = gr.Plot(label="MAE and hit rate against strength", visible=False, elem_id="lens-eval-curve")
    chart = gr.Plot(label="MAE and hit rate per pane", visible=False, elem_id="lens-eval-adapters-chart")
    flips = gr.Dataframe(
        label="Items right under one pane and wrong under another: select a row to open it in Compare",
        interactive=False,
        wrap=True,
        max_height=360,
        visible=False,
        elem_id="lens-eval-flips",
    )
    items = gr.Dataframe(label="Items (greedy predictions)", interactive=False, wrap=True, max_height=420)
    button.click(
        tab.ui_evaluate,
        inputs=[n_items, strengths, adapters],
        outputs=[metrics, plot, curve, chart, flips, items],
        **ON_MODEL,
        **PRIVATE,
    )
    return flips


def _own_data_layout(tab: EvaluateTab) -> None:
    gr.Markdown(
        '### Your own data\n\nA JSONL file with one `{"prompt": ..., "answer": ...}` object per line, or a '
        "CSV file with the columns `prompt` and `answer` (at most 200 examples, 1 MB). Each prompt is answered "
        "greedily by base and fine-tuned in one batch; each answer is checked against yours, and your answer's "
        "log-probability under each model is computed teacher-forced. The file is parsed as text, never run, "
        "and deleted once read."
    )
    with gr.Row():
        file = gr.File(
            label="Data file (JSONL or CSV)",
            file_types=[".jsonl", ".csv"],
            type="filepath",
            min_width=240,
            scale=3,
            elem_id="lens-own-file",
        )
        with gr.Column(min_width=240, scale=2):
            tokens = gr.Slider(
                *OWN_DATA_TOKENS, value=OWN_DATA_DEFAULT_TOKENS, step=1, label="Max new tokens per answer"
            )
            button = gr.Button(
                "Evaluate my data",
                variant="primary",
                interactive=tab.lens.has_adapter,
                elem_id="lens-own-run",
            )
    totals = gr.Markdown(elem_id="lens-own-totals", elem_classes=TABLE)
    items = gr.Dataframe(
        label="Examples", interactive=False, wrap=True, max_height=420, elem_id="lens-own-items"
    )
    button.click(tab.ui_evaluate_data, inputs=[file, tokens], outputs=[totals, items], **ON_MODEL, **PRIVATE)
    # /evaluate_data: the endpoint takes a file, so it is an event on these components (gr.api takes JSON only)
    gr.Button(visible=False).click(
        tab.evaluate_data,
        inputs=[file, tokens],
        outputs=[gr.JSON(visible=False)],
        api_name="evaluate_data",
        api_description=inspect.getdoc(tab.evaluate_data),
        **ON_MODEL,
    )
