"""The Lens: what every tab needs of the one loaded model — the backend (utils.core.seam.Backend), the profile,
and every call that runs the model, wrapped for ZeroGPU.

On a ZeroGPU Space each wrapped call runs in a GPU worker forked from the server, for a reserved time;
elsewhere spaces.GPU returns it unchanged. What crosses to the worker is pickled, so the calls take and return
plain values: no threading.Event (Stop closes the stream instead, which ends the run in the worker), no
progress callback (evaluation yields its progress), no logits of every position (the token lens returns its
scores). Only gr.Error keeps its message across the worker, so utils' errors become gr.Error inside the call.
"""

import contextlib
import functools
import inspect
import math

import spaces

from ui import views
from ui.common import evaluation_seconds, gpu_seconds, log, user_message, warn_all
from utils.core import profiles
from utils.core.errors import InputError
from utils.core.profiles import LLAMA31_PRICER
from utils.core.seam import Backend, GenerationSettings, Row, StreamUpdate

SCORING_SECONDS = 30  # ZeroGPU reservation for one teacher-forced pass or the adapter anatomy


def _rows_duration(prompt, rows, settings=None) -> int:
    """spaces.GPU's duration for stream_rows / run_rows, called with the same arguments as they are."""
    return gpu_seconds(settings.max_new_tokens if settings else 64, len(rows))


def _evaluation_duration(items, strengths=()) -> int:
    return evaluation_seconds(len(items), 2 + len(strengths))


def _own_data_duration(examples, max_new_tokens=32) -> int:
    return evaluation_seconds(len(examples), 2)


def on_gpu(duration):
    """spaces.GPU(duration=...) for a function or a generator function. Every failure inside becomes a gr.Error
    there, the one exception whose message crosses back from a ZeroGPU worker: utils' messages as written, an
    out-of-memory with what to reduce, anything else by its class with the details in the log."""

    def wrap(fn):
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def stream(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as exc:
                    raise gpu_failure(exc, fn.__name__) from None

            return spaces.GPU(duration=duration)(stream)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                raise gpu_failure(exc, fn.__name__) from None

        return spaces.GPU(duration=duration)(call)

    return wrap


def gpu_failure(exc: Exception, where: str):
    """The gr.Error a visitor reads for a failure inside a GPU call (gr.Error itself passes unchanged)."""
    import gradio as gr

    if isinstance(exc, gr.Error):
        return exc
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        log.warning("%s ran out of memory: %s", where, exc)
        return gr.Error(
            "The GPU ran out of memory: try fewer new tokens, a shorter prompt, or fewer strengths or examples "
            "at once. The model is free again.",
            print_exception=False,
        )
    return user_message(exc, where)


def until_stopped(updates, stop_event):
    """Pass a stream's updates on until it ends or Stop is pressed; then close it (which ends the run, here or
    in a ZeroGPU worker) and pass on a last update with the unfinished panes marked "stopped"."""
    with contextlib.closing(updates):
        for update in updates:
            if stop_event.is_set() and not update.finished:
                for state in update.panes.values():
                    if not state.done:
                        state.done, state.finish_reason = True, "stopped"
                yield StreamUpdate(update.panes, update.notices, update.prompt_tokens, finished=True)
                return
            yield update


class Lens:
    """The one Backend and what the tabs share of it. Tabs hold a Lens; none holds the model itself."""

    def __init__(self, backend_or_pair):
        self.backend: Backend = (
            backend_or_pair if isinstance(backend_or_pair, Backend) else _engine(backend_or_pair)
        )
        self.profile = self.backend.profile
        self.report = self.backend.report
        self.info = self.backend.info
        self.adapter_lora = profiles.adapter_lora(self.backend.adapter_dir, self.profile.lora)
        self.loaded_name = f"Loaded: {self.profile.name}"
        self.show_reference = self.profile.name != LLAMA31_PRICER.name
        self.stream_rows = on_gpu(_rows_duration)(self._stream_rows)
        self.run_rows = on_gpu(_rows_duration)(self.backend.run_rows)
        self.next_tokens = on_gpu(20)(self.backend.next_tokens)
        self.score_texts = on_gpu(SCORING_SECONDS)(self._score_texts)
        self.text_logprobs = on_gpu(SCORING_SECONDS)(self._text_logprobs)
        self.anatomy = on_gpu(SCORING_SECONDS)(self._anatomy)
        self.evaluation = on_gpu(_evaluation_duration)(self._evaluation)
        self.evaluation_data = on_gpu(_own_data_duration)(self._evaluation_data)

    @property
    def has_adapter(self) -> bool:
        return self.backend.has_adapter

    def decode(self, token_ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(token_ids, skip_special_tokens)

    def require_pricer(self, what: str) -> None:
        if not self.profile.is_pricer:
            raise InputError(
                f"{what} needs a pricer profile (one with a task prompt); {self.profile.name} has none."
            )

    def require_adapter(self, what: str) -> None:
        if not self.has_adapter:
            raise InputError(f"{what} needs the adapter, but none is loaded (base-only).")

    def both_or_base(self) -> str:
        return "both" if self.has_adapter else "base"

    def finished_run(self, prompt: str, rows: list[Row], settings: GenerationSettings, notices=()):
        """run_rows with its notices (a clamped setting, a prompt cut to fit the context) shown as warnings."""
        result = self.run_rows(prompt, rows, settings)
        warn_all((*notices, *result.notices))
        return result

    def prices(self, prompt: str, texts: dict[str, str], rows: list[Row]) -> tuple[dict, dict]:
        """The next-token views after the prompt and the price read from each row's text, keyed by row."""
        next_views = self.next_tokens(prompt, rows, views.PRICE_SCAN)
        labels = {row.key: row.label for row in rows}
        return next_views, views.price_estimates(texts, next_views, views.TOPK, labels)

    # The bodies of the GPU calls: plain values in, plain values out.

    def _stream_rows(self, prompt, rows, settings=None):
        yield from self.backend.stream_rows(prompt, rows, settings)

    def _score_texts(self, prompt_ids, texts, strength=1.0):
        from utils.analysis.token_lens import score_texts

        return score_texts(self.backend, prompt_ids, texts, strength)

    def _text_logprobs(self, prompt_ids, text_ids, strengths) -> list[float]:
        """log p(text | prompt) under each row's strengths, teacher-forced in one batch."""
        if not text_ids:
            return [0.0] * len(strengths)
        sequences = [prompt_ids + text_ids] * len(strengths)
        scores = self.backend.score_rows(sequences, list(strengths), len(prompt_ids) - 1)
        return [math.fsum(row.logprobs) for row in scores.rows]

    def _anatomy(self):
        from utils.analysis.anatomy import compute_anatomy

        self.require_adapter("The adapter anatomy")
        with self.backend.adapter_weights() as layers:
            return compute_anatomy(layers, self.adapter_lora.r, self.adapter_lora.alpha)

    def _evaluation(self, items, strengths=()):
        """(done, total) after each chunk, then the report."""
        from utils.task.evaluate import evaluation_steps

        yield from evaluation_steps(
            self.backend, items, batch_size=8, template=self.profile.task_prompt, strengths=strengths
        )

    def _evaluation_data(self, examples, max_new_tokens=32):
        """Your own examples: (done, total) after each chunk, then the report (utils/task/own_data.py)."""
        from utils.task.own_data import evaluation_steps

        yield from evaluation_steps(self.backend, examples, max_new_tokens)


def _engine(pair) -> Backend:
    """The in-process engine over a loaded pair (imported here: it brings torch, transformers and peft)."""
    from utils.runtime.engine import Engine

    return Engine(pair)
