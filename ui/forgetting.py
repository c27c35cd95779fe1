"""The forgetting check, a section of the Evaluate tab: a fixed sample of general text (a public-domain novel,
utils/task/forgetting.py) scored teacher-forced under the base, the fine-tune and any other strengths or
adapters; cross-entropy and perplexity per model, the change against the base, and the passages the fine-tune
lost most on, coloured as the token lens colours them. Plus /forgetting."""

import time

import gradio as gr

from ui.common import ON_MODEL, PRIVATE, TABLE, report_of, unchanged, user_errors
from ui.lens import Lens
from ui.views import forgetting as views
from ui.views.lens import LENS_CSS, lens_html
from utils.core.errors import InputError
from utils.core.inputs import parse_strengths
from utils.core.panes import other_adapters
from utils.core.seam import FINE_TUNED, Use, strength_label
from utils.task import forgetting

DEFAULT_PASSAGES = 24


class ForgettingCheck:
    def __init__(self, lens: Lens):
        self.lens = lens

    def _models(self, strengths, adapters) -> dict[str, Use]:
        """base, fine_tuned, then every other strength of the primary adapter and every other adapter."""
        models = {"base": Use(None, 0.0)}
        if not self.lens.has_adapter:
            raise InputError(
                "The forgetting check compares the fine-tune with the base, but no adapter is loaded."
            )
        models[FINE_TUNED] = Use(FINE_TUNED, 1.0)
        text = strengths.strip() if isinstance(strengths, str) else strengths
        for s in parse_strengths(text) if text else []:
            if s not in (0.0, 1.0):
                models[strength_label(s)] = Use(FINE_TUNED, s)
        for name in other_adapters(adapters, self.lens.backend):
            models.setdefault(name, Use(name, 1.0))
        return models

    def _run(self, n_passages, strengths, adapters, progress=None):
        n = forgetting.check_passages(n_passages)
        models = self._models(strengths, adapters)
        passages = forgetting.load_passages(self.lens.backend, n)
        return report_of(run_forgetting(self.lens, passages, models), progress)

    @user_errors
    def forgetting(self, n_passages: int = DEFAULT_PASSAGES, strengths: str = "", adapters: str = "") -> dict:
        """What the fine-tune forgot: a fixed sample of general text scored under the base and the fine-tune.

        The sample: Natsume Soseki's novel Botchan (English, 1919; Project Gutenberg #8868, public domain), cut
        into passages of up to 256 tokens; each passage is scored teacher-forced under every model in one batch.
        Args:
            n_passages: passages of the sample to score, 1-96 (the whole sample is over 20,000 tokens)
            strengths: optional other strengths of the fine-tune to score too (e.g. "0.5, 1.5")
            adapters: optional other loaded adapters to score too, comma-separated (see /adapters)
        Returns:
            forgetting: {"sample": {"source", "passages", "tokens"}, "seconds", "models": [{"model",
            "cross_entropy", "perplexity", "change_vs_base", "perplexity_ratio_vs_base", "mean_kl_vs_base",
            "tokens"}], "passages": [{"index", "tokens", "cross_entropy": {model: float}}], "most_forgotten":
            [{"index", "text", "cross_entropy_rise"}]}. cross_entropy is the mean negative log-probability per
            token (nats) of every token after a passage's first; the perplexity is its exponential.
        """
        report = self._run(n_passages, strengths, adapters)
        return views.forgetting_json(report, self._sample(report))

    @staticmethod
    def _sample(report) -> dict:
        return {
            "source": forgetting.SAMPLE_SOURCE,
            "passages": len(report.passages),
            "tokens": sum(len(p.passage.token_ids) for p in report.passages),
        }

    @user_errors
    def ui_forgetting(self, n_passages, strengths, adapters, progress=gr.Progress()):  # noqa: B008 - gradio injects it
        progress(0, desc="Scoring the general-text sample ...")
        try:
            report = self._run(
                n_passages,
                strengths,
                adapters or [],
                lambda done, total: progress(
                    (done, total), desc=f"{done} of {total} passages", unit="passages"
                ),
            )
        except InputError as exc:
            return unchanged(exc, 4)
        worst = views.worst_passage_scored(
            report, lambda ids: self.lens.decode(ids, skip_special_tokens=True)
        )
        model = views.ranked_model(report)
        return (
            views.totals_markdown(report),
            views.forgetting_figure(report),
            views.worst_passages_frame(report),
            lens_html(worst, {k: k for k in worst}, (model, "base")) if worst else "",
        )


def run_forgetting(lens: Lens, passages, models):
    """(done, total) after each batch, then the report: GPU calls of at most the budget's call length each."""
    started, scored = time.perf_counter(), []
    for call in lens.budget.chunks(lens.durations.forgetting_works(passages, models)):
        part = passages[call.start * forgetting.BATCH_PASSAGES : call.stop * forgetting.BATCH_PASSAGES]
        for batch in lens.gpu_forgetting(part, models):
            scored += batch
            yield len(scored), len(passages)
    yield forgetting.build_report(scored, models, time.perf_counter() - started)


def layout(check: ForgettingCheck) -> None:
    lens = check.lens
    gr.Markdown(
        "### What the fine-tune forgot: general text\n\n"
        "A fixed sample of general English prose, **not** the fine-tune's task: Natsume Soseki's novel "
        "*Botchan* (1919 translation; Project Gutenberg #8868, public domain), cut into passages of up to 256 "
        "tokens. Every passage is scored teacher-forced under the base and the fine-tune (and any strengths or "
        "adapters chosen) in one batch: a cross-entropy above the base's is general text the fine-tune lost."
    )
    if not lens.has_adapter:
        gr.Markdown("No adapter is loaded (base-only): there is no fine-tune to check.")
        return
    with gr.Row():
        n_passages = gr.Slider(
            1, forgetting.SAMPLE_PASSAGES, value=DEFAULT_PASSAGES, step=1, label="Passages"
        )
        strengths = gr.Textbox(value="", label="Also these strengths s (optional, e.g. 0.5, 1.5)")
        others = lens.backend.adapter_names[1:]
        adapters = gr.CheckboxGroup(others, value=[], label="Also these adapters", visible=bool(others))
        button = gr.Button("Check forgetting", variant="primary", elem_id="lens-forget-run")
    totals = gr.Markdown(elem_id="lens-forget-totals", elem_classes=TABLE)
    chart = gr.Plot(show_label=False, elem_id="lens-forget-chart")
    worst = gr.Dataframe(
        label="The passages the fine-tune lost most on",
        interactive=False,
        wrap=True,
        elem_id="lens-forget-worst",
    )
    tokens = gr.HTML(css_template=LENS_CSS, elem_id="lens-forget-tokens")
    button.click(
        check.ui_forgetting,
        inputs=[n_passages, strengths, adapters],
        outputs=[totals, chart, worst, tokens],
        **ON_MODEL,
        **PRIVATE,
    )
