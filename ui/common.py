"""What every tab shares: error wrapping (utils' messages become gr.Error, never a trace), event settings,
the theme, and small layout helpers."""

import contextlib
import functools
import html
import inspect
import logging
from contextlib import contextmanager

import gradio as gr

from ui import views
from utils.core.errors import InputError, LoraLensError
from utils.core.inputs import MAX_NEW_TOKENS_RANGE
from utils.core.seam import PANE_LABELS

log = logging.getLogger("lora_lens")

MODEL = "model"  # concurrency_id of every event that runs the model: one at a time (the engine locks too)
QUEUE_MAX_SIZE = 32  # requests waiting beyond this are told the queue is full
TABLE = ["lens-table"]  # elem_classes of a Markdown block that holds a table (see CSS)
PRIVATE = dict(api_visibility="private")  # UI handlers: not on the API page, not callable by clients
ON_MODEL = dict(concurrency_id=MODEL, concurrency_limit=1)


def user_message(exc: Exception, where: str) -> gr.Error:
    if isinstance(exc, LoraLensError):
        return gr.Error(html.escape(str(exc), quote=False), print_exception=False)
    log.exception("%s failed", where)
    return gr.Error(
        f"Something went wrong in {where} ({type(exc).__name__}); the details are in the server log. "
        "The model is free again: try once more.",
        print_exception=False,
    )


def unchanged(exc: InputError, n_outputs: int) -> tuple:
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
        raise user_message(exc, where) from None


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


def stop_run(stop) -> None:
    """The Stop button: set the event of the session's current run (a views.StopSignal in a gr.State)."""
    if isinstance(stop, views.StopSignal):
        stop.stop()


def warn_all(notices) -> None:
    for notice in notices:
        gr.Warning(notice)


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
/* Tables scroll sideways inside their block on a phone instead of breaking words into letters. */
.lens-table table { display: block; overflow-x: auto; max-width: 100%; }
.lens-table th, .lens-table td { white-space: nowrap; word-break: normal; }
"""


def pane(key: str, visible: bool = True, label: str | None = None, elem_name: str | None = None):
    """One output pane: its text (streamed) and the stats line under it, in a column that wraps on phones."""
    name = elem_name or ("base" if key == "base" else "tuned")
    with gr.Column(min_width=300, visible=visible) as column:
        text = gr.Textbox(
            label=label or PANE_LABELS[key],
            lines=8,
            max_lines=20,
            interactive=False,
            buttons=["copy"],
            elem_id=f"lens-pane-{name}",
        )
        stats = gr.Markdown(elem_classes=["lens-stats"], elem_id=f"lens-stats-{name}")
    return column, text, stats


def code(
    value, label: str, elem_id: str, language=None, wrap: bool = False, max_lines: int = 40, visible=True
):
    """A read-only printout in a column that scrolls sideways instead of widening the page."""
    with gr.Column(min_width=320, elem_classes=["lens-code-col"], visible=visible) as column:
        block = gr.Code(
            value,
            language=language,
            label=label,
            max_lines=max_lines,
            show_line_numbers=False,
            wrap_lines=wrap,
            elem_id=elem_id,
        )
    return column, block


def generation_settings(open_: bool = False, max_new_tokens: int = 64):
    """The sampling controls every generating view shares: (max_new_tokens, temperature, top_p, seed)."""
    from utils.core.inputs import SEED_RANGE, TEMPERATURE_RANGE, TOP_P_RANGE

    with gr.Accordion("Generation settings", open=open_):
        n = gr.Slider(*MAX_NEW_TOKENS_RANGE, value=max_new_tokens, step=1, label="Max new tokens")
        temperature = gr.Slider(*TEMPERATURE_RANGE, value=0.0, step=0.05, label="Temperature (0 = greedy)")
        top_p = gr.Slider(*TOP_P_RANGE, value=1.0, step=0.01, label="Top-p")
        seed = gr.Number(value=0, precision=0, label=f"Seed (0 to {SEED_RANGE[1]})")
    return n, temperature, top_p, seed


def example_prompts(prompt, profile, label: str = "Examples") -> None:
    """The profile's example prompts as buttons that fill `prompt` (not on the API page)."""
    examples = views.example_prompts(profile)
    gr.Examples(
        examples=[[p] for _, p in examples],
        inputs=[prompt],
        example_labels=[name for name, _ in examples],
        label=label,
        **PRIVATE,
    )


def report_of(steps, progress=None):
    """The report an evaluation generator ends with, passing its (done, total) steps to `progress` on the way."""
    report = None
    with contextlib.closing(steps):
        for step in steps:
            if isinstance(step, tuple):
                if progress is not None:
                    progress(*step)
            else:
                report = step
    return report
