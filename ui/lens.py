"""The Lens: what every tab needs of the one loaded model — the backend (utils.core.seam.Backend), the profile,
and every call that runs the model, wrapped for ZeroGPU (ui/gpu.py).

One user action is one GPU call: a Compare click streams the panes and then, from the same call, the prices
(the next-token views after the prompt) and the token lens's scores (`After` says which); /estimate_price,
/token_lens and the block sweep likewise. Inputs are checked here, in the server process, before any call is
scheduled, so a bad input never costs a visitor's quota. An evaluation is several calls of bounded duration,
with its progress between them.

What crosses to a ZeroGPU worker is pickled, so the calls take and return plain values: no threading.Event
(Stop closes the stream instead, which ends the run in the worker), no progress callback (evaluation yields
its batches), no logits of every position (the token lens returns its scores).
"""

import contextlib
import logging
import math
import time
from dataclasses import dataclass, replace

from ui import views
from ui.common import warn_all
from ui.durations import EVAL_BATCH, OWN_DATA_BATCH, Durations
from ui.gpu import on_gpu
from utils.core import profiles
from utils.core.errors import InputError
from utils.core.gpu_budget import GpuBudget
from utils.core.inputs import clean_prompt
from utils.core.profiles import LLAMA31_PRICER
from utils.core.row_prompts import pane_prompts, prompt_of
from utils.core.seam import (
    FINE_TUNED,
    Backend,
    GenerationSettings,
    Row,
    StreamUpdate,
)

log = logging.getLogger("lora_lens")


@dataclass(frozen=True)
class After:
    """What a generation call also computes, after its run and in the same GPU call."""

    price_scan: int = 0  # >0: each row's most likely next tokens after the prompt (the price views)
    lens_strength: float | None = None  # the token lens: every pane's text under the base and this strength
    score_under_rows: str | None = None  # a row's key: log p of that row's text under every row's strengths
    pane_pair: tuple[str, str] | None = (
        None  # every row's text under every row's model; this pair token by token
    )


NOTHING_AFTER = After()


@dataclass
class Afterwards:
    """What After asked for (None where it did not)."""

    next_views: dict | None = None  # row key -> NextTokenView
    scored: dict | None = None  # pane key -> token_lens.ScoredText
    logprobs: list[float] | None = None  # one per row, in the rows' order
    pane_lens: object = None  # utils.analysis.pane_lens.PaneLens


def until_stopped(updates, stop_event):
    """Pass a stream's items on until it ends or Stop is pressed; then close it (which ends the run, here or
    in a ZeroGPU worker) and pass on a last update with the unfinished panes marked "stopped"."""
    with contextlib.closing(updates):
        for update in updates:
            if stop_event.is_set() and isinstance(update, StreamUpdate) and not update.finished:
                for state in update.panes.values():
                    if not state.done:
                        state.done, state.finish_reason = True, "stopped"
                yield StreamUpdate(update.panes, update.notices, update.prompt_tokens, finished=True)
                return
            if stop_event.is_set() and not isinstance(update, StreamUpdate):
                return  # stopped after the panes finished: what follows them is not wanted
            yield update


class Lens:
    """The one Backend and what the tabs share of it. Tabs hold a Lens; none holds the model itself."""

    def __init__(self, backend_or_pair, budget: GpuBudget | None = None, counterpart=None):
        self.backend: Backend = _backend(backend_or_pair)
        other = _backend(counterpart) if counterpart is not None else None  # (reference, served) for parity
        self.parity_pair = None if other is None else tuple(sorted((self.backend, other), key=_served_second))
        self.budget = budget or GpuBudget(**profiles.read_settings().gpu_figures)
        self.profile = self.backend.profile
        self.report = self.backend.report
        self.info = self.backend.info
        self.adapter_lora = profiles.adapter_lora(self.backend.adapter_dir, self.profile.lora)
        self.show_reference = self.profile.name != LLAMA31_PRICER.name
        # The GPU calls: each with its duration, a function of the same arguments (spaces.GPU calls it so).
        self.durations = Durations(self)
        self._gpu_stream = on_gpu(self.durations.generation, "the generation")(self._stream_body)
        self._gpu_run = on_gpu(self.durations.generation, "the generation")(self._run_body)
        self._gpu_evaluate = on_gpu(self.durations.evaluation, "the evaluation")(self._evaluate_body)
        self._gpu_own_data = on_gpu(self.durations.own_data, "the evaluation")(self._own_data_body)
        self._gpu_anatomy = on_gpu(self.durations.anatomy, "the adapter anatomy")(self._anatomy_body)
        self._gpu_similarity = on_gpu(self.durations.anatomy, "comparing adapters")(self._similarity_body)
        self.gpu_forgetting = on_gpu(self.durations.forgetting, "the forgetting check")(self._forgetting_body)

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

    # -----------------------------------------------------------------------------------------------
    # The calls the tabs make (in the server process: inputs checked, then one GPU call)

    def stream(
        self, prompt: str, rows: list[Row], settings: GenerationSettings, after: After = NOTHING_AFTER
    ):
        """Every StreamUpdate of one batch, then (unless closed early) one Afterwards, from ONE GPU call."""
        clean_prompt(prompt)  # an empty prompt is refused here, before a GPU task is scheduled
        for item in self._gpu_stream(prompt, rows, settings, after):
            if isinstance(item, StreamUpdate) and item.finished:
                self._observe(item)
            yield item

    def run(self, prompt: str, rows: list[Row], settings: GenerationSettings, after: After = NOTHING_AFTER):
        """(the final StreamUpdate, Afterwards) of one batch, from ONE GPU call; notices shown as warnings."""
        clean_prompt(prompt)
        result, afterwards = self._gpu_run(prompt, rows, settings, after)
        self._observe(result)
        return result, afterwards

    def finished_run(self, prompt, rows, settings, notices=(), after: After = NOTHING_AFTER):
        """run() with its notices (a clamped setting, a prompt cut to fit the context) shown as warnings."""
        result, afterwards = self.run(prompt, rows, settings, after)
        warn_all((*notices, *result.notices))
        return result, afterwards

    def price_views(self, texts: dict[str, str], next_views: dict, rows: list[Row]) -> dict:
        """The price read from each row's text and next-token view, keyed by row."""
        labels = {row.key: row.label for row in rows}
        return views.price_estimates(texts, next_views, views.TOPK, labels)

    def evaluation(self, items, strengths=(), adapters=()):
        """(done, total) after each batch, then the report: GPU calls of at most budget.call_s each. `adapters`
        names more loaded adapters to score, each a pane at s = 1."""
        from utils.task.evaluate import build_report, strength_panes

        if not items:
            raise InputError("There are no items to evaluate; pass at least one.")
        self.require_adapter("The evaluation")
        started, panes, results = time.perf_counter(), strength_panes(strengths, adapters), []
        for call in self.budget.chunks(self.durations.catalog_works(items, panes)):
            for batch in self._gpu_evaluate(items[call.start * EVAL_BATCH : call.stop * EVAL_BATCH], panes):
                results += batch
                yield len(results), len(items)
        yield build_report(results, panes, 3, time.perf_counter() - started)

    def evaluation_data(self, examples, max_new_tokens=32):
        """Your own examples: (done, total) after each batch, then the report (utils/task/own_data.py)."""
        from utils.task.own_data import build_report

        self.require_adapter("Evaluating your data")
        started, scored = time.perf_counter(), []
        for call in self.budget.chunks(self.durations.own_data_works(examples, max_new_tokens)):
            part = examples[call.start * OWN_DATA_BATCH : call.stop * OWN_DATA_BATCH]
            for batch in self._gpu_own_data(part, max_new_tokens):
                scored += batch
                yield len(scored), len(examples)
        yield build_report(scored, time.perf_counter() - started, max_new_tokens)

    def anatomy(self, adapter: str = FINE_TUNED):
        self.require_adapter("The adapter anatomy")
        self.backend.adapter_named(adapter)  # an unknown name is refused before any GPU call
        return self._gpu_anatomy(adapter)

    def similarity(self, a: str, b: str, top_k: int):
        self.require_adapter("Comparing adapters")
        self.backend.adapter_named(a), self.backend.adapter_named(b)
        return self._gpu_similarity(a, b, top_k)

    def _observe(self, update: StreamUpdate) -> None:
        """The decode rate a finished run measured, for the next reservations."""
        spans = [
            (state.tokens - 1, state.last_token_s - state.first_token_s)
            for state in update.panes.values()
            if state.first_token_s is not None and state.last_token_s is not None
        ]
        if spans:
            self.budget.observe(*max(spans))

    # -----------------------------------------------------------------------------------------------
    # The bodies of the GPU calls: plain values in, plain values out

    def _stream_body(self, prompt, rows, settings, after=NOTHING_AFTER):
        update = None
        for update in self.backend.stream_rows(prompt, rows, kept_for(settings, after)):
            yield update
        if update is not None and after != NOTHING_AFTER:
            yield afterwards(self.backend, prompt, rows, settings, update, after)

    def _run_body(self, prompt, rows, settings, after=NOTHING_AFTER):
        result = self.backend.run_rows(prompt, rows, kept_for(settings, after))
        return result, afterwards(self.backend, prompt, rows, settings, result, after)

    def _evaluate_body(self, items, panes):
        from utils.task.evaluate import score_items

        yield from score_items(self.backend, items, 3, EVAL_BATCH, self.profile.task_prompt, panes)

    def _own_data_body(self, examples, max_new_tokens):
        from utils.task.own_data import score_examples

        for i in range(0, len(examples), OWN_DATA_BATCH):
            yield score_examples(self.backend, examples[i : i + OWN_DATA_BATCH], max_new_tokens)

    def _anatomy_body(self, adapter=FINE_TUNED):
        from utils.analysis.anatomy import compute_anatomy

        info = self.backend.adapter_named(adapter) if self.info.adapters else {}
        r, alpha = info.get("r") or self.adapter_lora.r, info.get("alpha") or self.adapter_lora.alpha
        with self.backend.adapter_weights(adapter) as layers:
            return compute_anatomy(layers, r, alpha)

    def _forgetting_body(self, passages, models):
        yield from forgetting_scores(self.backend, passages, models)

    def _similarity_body(self, a, b, top_k):
        return similarity_of(self.backend, a, b, top_k)


def kept_for(settings, after: After):
    """The run's settings, asking the backend to keep what it computed where `after` scores the run's texts or
    prompt (the in-process engine then computes only what the run did not: utils/runtime/kept_run.py)."""
    scores = after.price_scan or any(
        value is not None for value in (after.lens_strength, after.pane_pair, after.score_under_rows)
    )
    return replace(settings or GenerationSettings(), keep_for_scoring=True) if scores else settings


def afterwards(backend: Backend, prompt, rows, settings, update: StreamUpdate, after: After) -> Afterwards:
    """What `after` asks for, once the run `update` ended: inside the GPU call that ran it."""
    if after == NOTHING_AFTER:
        return Afterwards()
    try:
        return _afterwards(backend, prompt, rows, settings, update, after)
    finally:
        backend.release_kept_run()


def _afterwards(backend: Backend, prompt, rows, settings, update: StreamUpdate, after: After) -> Afterwards:
    out = Afterwards()
    prompt_ids = pane_prompts(backend, prompt, rows, settings.max_new_tokens)
    if after.price_scan:
        out.next_views = backend.next_tokens(prompt, rows, after.price_scan)
    if after.lens_strength is not None:
        from utils.analysis.token_lens import score_texts

        texts = {key: list(state.token_ids) for key, state in update.panes.items()}
        out.scored = score_texts(backend, prompt_ids, texts, after.lens_strength)
    if after.pane_pair is not None:
        from utils.analysis.pane_lens import score_panes
        from utils.core.seam import Use

        texts = {row.key: list(update.panes[row.key].token_ids) for row in rows}
        models = {row.key: Use(row.adapter, row.strength) for row in rows}
        labels = {row.key: row.label for row in rows}
        out.pane_lens = score_panes(backend, prompt_ids, texts, models, labels, after.pane_pair)
    if after.score_under_rows is not None:
        text_ids = list(update.panes[after.score_under_rows].token_ids)
        out.logprobs = logprobs_under(backend, prompt_ids, text_ids, list(rows))
    return out


def forgetting_scores(backend: Backend, passages, models):
    """The general-text passages under each model, a batch at a time (utils/task/forgetting.py)."""
    from utils.task.forgetting import score_passages

    yield from score_passages(backend, passages, models)


def similarity_of(backend: Backend, a: str, b: str, top_k: int):
    """Two adapters' updates compared layer by layer (utils/analysis/similarity.py), inside one GPU call."""
    from utils.analysis.similarity import similarity

    with backend.adapter_weights(a) as layers_a:
        pass  # the weights stay valid after the lock: the adapters never change while the app serves
    with backend.adapter_weights(b) as layers_b:
        return similarity(a, layers_a, b, layers_b, top_k)


def logprobs_under(backend: Backend, prompt_ids, text_ids, rows: list[Row]) -> list[float]:
    """log p(text | each row's prompt) under each row's model, teacher-forced in one batch."""
    if not text_ids:
        return [0.0] * len(rows)
    prompts = [prompt_of(prompt_ids, row.key) for row in rows]
    sequences = [ids + text_ids for ids in prompts]
    scores = backend.score_rows(sequences, list(rows), [len(ids) - 1 for ids in prompts])
    return [math.fsum(row.logprobs) for row in scores.rows]


def _served_second(backend: Backend) -> bool:
    return not backend.info.exact_kl  # the in-process engine scores the whole vocabulary, a server its top k


def _backend(backend_or_pair) -> Backend:
    """A Backend as is, or the in-process engine over a loaded pair (imported here: it brings torch,
    transformers and peft)."""
    if isinstance(backend_or_pair, Backend):
        return backend_or_pair
    from utils.runtime.engine import Engine

    return Engine(backend_or_pair)


def model_concurrency(lens: Lens) -> int:
    """Model events the app runs at once: one on the in-process engine, several on a server."""
    return 1 if lens.backend.info.exact_kl else profiles.read_settings().serving.concurrency


def backend_status(lens: Lens) -> str:
    """The backends' live state (a server's reachability), asked again: "" for the in-process engine alone."""
    backends = [lens.backend] + ([lens.parity_pair[1]] if lens.parity_pair else [])
    lines = [backend.status(refresh=True) for backend in backends]
    return "\n".join(dict.fromkeys(line for line in lines if line))
