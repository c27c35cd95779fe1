"""The in-process Backend: generation and scoring over one model in which every batch row carries its own
adapter strength.

A LoRA layer's output is `base(x) + s · (alpha / r) · B A x`; the strength router (`router.py`) sets `s` per
row (0 = the base, 1 = the fine-tune, anything in [-2, 3] between and beyond), and per layer where an ablation
asks for it. So the base and fine-tune panes, a strength sweep, or teacher-forced scoring all run as ONE batch
over ONE model and ONE adapter copy: nothing is reloaded and no global flag is flipped. One lock serialises all
model use; a request that waits too long for it is told so rather than left hanging.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from utils.core.errors import GenerationError, InputError
from utils.core.seam import (
    FINE_TUNED,
    Backend,
    BackendInfo,
    ChunkAnswer,
    GenerationSettings,
    NextTokenView,
    PaneState,
    Row,
    Scores,
    StreamUpdate,
    Use,
    placement,
)
from utils.runtime import greedy_loop
from utils.runtime.generation import (
    NoEndOfSequence,
    RowStreamer,
    StopOnEvent,
    as_generation_error,
    eos_ids,
    left_padded,
)
from utils.runtime.kept_run import KeptRun, KeptRunScoring, fits_budget
from utils.runtime.loading import LoadedPair
from utils.runtime.merging import MergeSupport
from utils.runtime.prompts import PromptSupport
from utils.runtime.router import StrengthRouter, row_strengths, shared_state
from utils.runtime.scoring import generate_chunk, scores_from_logits, teacher_forced_logits, top_view
from utils.runtime.threads import in_own_thread, torch_threads

LOCK_TIMEOUT_S = 180.0  # how long a request waits for the model before it is told the app is busy
TOKEN_TIMEOUT_S = 120.0  # longest silence between two tokens before the request is abandoned


class Engine(PromptSupport, MergeSupport, KeptRunScoring, Backend):
    """The one loaded model (NF4 base + LoRA adapter, or the base alone) as a Backend, serialised by a lock."""

    def __init__(
        self,
        pair: LoadedPair,
        lock_timeout_s: float = LOCK_TIMEOUT_S,
        token_timeout_s: float = TOKEN_TIMEOUT_S,
    ):
        self.pair = pair
        self.profile, self.report, self.adapter_dir = pair.profile, pair.report, pair.adapter_dir
        self.model = pair.model
        self.config = getattr(pair.model, "config", None)
        self.tokenizer = pair.tokenizer
        shared = shared_state(self.model)
        self.lock = shared["lock"]
        self.router: StrengthRouter | None = shared["router"]
        release_freed_memory()  # what loading and stacking the adapters freed
        self.lock_timeout_s = lock_timeout_s
        self.token_timeout_s = token_timeout_s
        config = getattr(self.model, "config", None)
        self.context_length = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        self.eos_ids = eos_ids(self.model, self.tokenizer)
        # generation and forward_rows run in threads of their own, on this many CPU threads (0 on the GPU)
        self.threads = getattr(pair.report, "cpu_threads", 0)
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        )
        self.info = BackendInfo(
            name="in-process (transformers + peft)",
            has_adapter=pair.has_adapter and self.router is not None,
            lora_layers=tuple(self.router.names) if self.router is not None else (),
            max_top_k=len(self.tokenizer),
            context_length=self.context_length,
            n_layers=int(getattr(config, "num_hidden_layers", 0) or 0),
            inspectable=True,
            adapters=_adapter_infos(pair, self.router),
        )

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def loaded_model(self):
        return self.model

    def placement(self, items) -> tuple[list, list]:
        """(strengths, adapter positions) for the router (seam.placement)."""
        return placement(self, items)

    def _acquire(self) -> None:
        if not self.lock.acquire(timeout=self.lock_timeout_s):
            raise GenerationError(
                f"The model is busy with other requests; waited {self.lock_timeout_s:.0f} s. Try again."
            )

    @contextmanager
    def exclusive(self):
        """Hold the model for work that reads its weights (anatomy, printouts); yields the model."""
        self._acquire()
        try:
            yield self.model
        finally:
            self.lock.release()

    @contextmanager
    def adapter_weights(self, adapter: str = FINE_TUNED):
        """Hold the model and yield every layer the named adapter adapts, with its weights
        (utils/runtime/weights.py)."""
        from utils.runtime.weights import lora_weights

        if self.router is None:
            with self.exclusive():
                yield []
            return
        position = placement(self, [Use(adapter, 1.0)])[1][0]
        with self.exclusive():
            yield lora_weights(self.router, position, self.original_weights())

    def original_weights(self):
        """The base's own full-precision weights (utils/runtime/merging.OriginalWeights), found once; None
        where its folder or the Hub cache holds no safetensors."""
        from utils.runtime.merging import OriginalWeights

        if not hasattr(self, "_originals"):
            self._originals = OriginalWeights.of(self.model)
        return self._originals

    # Generation: a worker thread runs generate() holding the lock and hands each step's tokens to a queue.

    def stream_rows(self, prompt, rows, settings=None, stop_event=None) -> Iterator[StreamUpdate]:
        settings = settings or GenerationSettings()
        prompts, notices = self.row_prompts(prompt, rows, settings.max_new_tokens)
        run = _StreamingRun(self, prompts, rows, settings, stop_event or threading.Event(), notices)
        return run.updates()

    # Teacher-forced passes

    def forward_rows(self, sequences: list[list[int]], strengths: list, keep_from=0) -> torch.Tensor:
        """Teacher-forced logits: one forward pass over right-padded rows, each at its own strength.

        Returns float32 logits on the CPU, [rows, longest - k, vocab] with k the smallest keep_from (one for
        every row, or one per row): position j predicts the token at k + j + 1. Right padding keeps every
        row's positions as in an unpadded run; pads come after the real tokens, so the causal mask hides them
        from every real position.
        """
        first_kept = min(keep_from) if isinstance(keep_from, (list, tuple)) else keep_from
        placed = self.placement(strengths)
        with self.exclusive():
            return teacher_forced_logits(self.model, self.threads, self.pad_id, sequences, placed, first_kept)

    def score_rows(self, sequences, strengths, keep_from=0, top_k=0, kl_pairs=()) -> Scores:
        keep = list(keep_from) if isinstance(keep_from, (list, tuple)) else [keep_from] * len(sequences)
        if len(keep) != len(sequences):
            raise InputError("keep_from must be one position, or one per sequence.")
        row_logits = self.row_logits(sequences, strengths, keep)
        # vocabulary-wide softmaxes, top candidates and KL: on the engine's threads too, not the caller's one
        return in_own_thread(
            self.threads, lambda: scores_from_logits(row_logits, sequences, keep, top_k, kl_pairs)
        )

    def next_tokens(self, prompt: str, rows: list[Row], top_k: int = 10) -> dict[str, NextTokenView]:
        prompts, _ = self.row_prompts(prompt, rows, 1)
        # one more token than the prompt, so each row has its one position: the prompt's last
        logits = self.row_logits(
            [ids + [self.pad_id] for ids in prompts], rows, [len(ids) - 1 for ids in prompts]
        )
        return {row.key: top_view(self.tokenizer, row.key, logits[i][0], top_k) for i, row in enumerate(rows)}

    def evaluate_chunk(self, prompts, strengths, max_new_tokens, top_k) -> list[list[ChunkAnswer]]:
        """Every prompt at every strength in one greedy generate() (runtime/scoring.py: generate_chunk), holding
        the model; runs in the calling thread."""
        placed = self.placement(strengths)
        with self.exclusive():
            return generate_chunk(self.model, self.tokenizer, prompts, placed, max_new_tokens, top_k)


def _adapter_infos(pair: LoadedPair, router) -> tuple[dict, ...]:
    """BackendInfo.adapters: what the loader recorded, or, for a model attached by hand (tests, scripts), the
    router's adapters under their peft names, the primary called FINE_TUNED."""
    if router is None:
        return ()
    if pair.adapters:
        return tuple(adapter.as_dict() for adapter in pair.adapters)
    return tuple(
        {"name": FINE_TUNED if i == 0 else name, "primary": i == 0, "source": "", "step": None}
        for i, name in enumerate(router.adapter_names)
    )


def release_freed_memory() -> None:
    """Hand the memory freed while loading back to the system (glibc keeps freed blocks for reuse otherwise):
    each adapter's file read, peft's first copy of its weights and the stacking leave some 2x an adapter's
    size in the process's resident memory that nothing uses (bench/bench_adapters.py measures it)."""
    import contextlib
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc: nothing to hand back this way
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


class _StreamingRun:
    """One stream_rows call: generate() in a worker thread that owns the lock, tokens handed over a queue."""

    def __init__(self, engine: Engine, prompts, rows, settings, stop_event, notices):
        self.engine, self.prompts, self.rows, self.settings = engine, prompts, rows, settings
        self.placed = engine.placement(
            rows
        )  # checked before the lock is taken: an unknown adapter fails here
        self.stop_event, self.notices = stop_event, notices
        self.tokens: queue.Queue = queue.Queue()
        self.errors: list[BaseException] = []

    def updates(self) -> Iterator[StreamUpdate]:
        engine, stop_event = self.engine, self.stop_event
        prompt_tokens = max(len(ids) for ids in self.prompts)
        keys = [row.key for row in self.rows]
        started = time.perf_counter()
        states = {row.key: PaneState(row.key, row.label) for row in self.rows}
        engine._acquire()
        worker = threading.Thread(target=self._generate_locked, name="lora-lens-generate", daemon=True)
        try:
            worker.start()
        except BaseException:
            engine.lock.release()
            raise
        finished = False
        try:
            yield StreamUpdate(states, list(self.notices), prompt_tokens)
            while True:
                try:
                    kind, row_tokens = self.tokens.get(timeout=engine.token_timeout_s)
                except queue.Empty:
                    stop_event.set()
                    raise GenerationError(
                        f"Generation produced nothing for {engine.token_timeout_s:.0f} s and was stopped."
                    ) from None
                if kind == "end":
                    break
                now = time.perf_counter() - started
                for key, token in zip(keys, row_tokens, strict=True):
                    self._advance(states[key], token, now)
                yield StreamUpdate(states, list(self.notices), prompt_tokens)
            worker.join(timeout=engine.token_timeout_s)
            if self.errors:
                raise as_generation_error(self.errors[0])
            for state in states.values():
                if not state.done:
                    state.done = True
                    state.finish_reason = "stopped" if stop_event.is_set() else "length"
            finished = True
            yield StreamUpdate(states, list(self.notices), prompt_tokens, finished=True)
        finally:
            if not finished:
                stop_event.set()  # the consumer left: end generation so the lock is released promptly

    def _advance(self, state: PaneState, token: int, now: float) -> None:
        if state.add(token, now, self.engine.eos_ids):
            state.text = self.engine.tokenizer.decode(state.token_ids, skip_special_tokens=True)

    def _generate_locked(self) -> None:
        """Runs in the worker thread, which owns the lock until generation ends."""
        engine = self.engine
        try:
            with torch_threads(engine.threads):
                self._generate(RowStreamer(self.tokens))
        except BaseException as exc:  # reported to the consumer; the thread itself must not die silently
            self.errors.append(exc)
            self.tokens.put(("end", None))
        finally:
            engine.lock.release()

    def _generate(self, streamer) -> torch.Tensor:
        """transformers' generate() over the rows at their strengths (this thread holds the lock)."""
        engine, settings = self.engine, self.settings
        device = next(engine.model.parameters()).device
        input_ids, attention_mask = left_padded(self.prompts, engine.pad_id)
        kwargs = dict(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=settings.max_new_tokens,
            logits_processor=LogitsProcessorList(
                [NoEndOfSequence(engine.eos_ids)] if settings.ignore_eos else []
            ),
            pad_token_id=engine.pad_id,
            eos_token_id=engine.eos_ids,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([StopOnEvent(self.stop_event)]),
        )
        # the last run's kept logits and cache are not this run's: freed before this one keeps its own
        engine.kept = None
        keep = (
            settings.keep_for_scoring
            and device.type == "cpu"
            and fits_budget(len(self.prompts), settings.max_new_tokens, engine.vocabulary_size())
        )
        if keep:
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        if settings.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=None)
            torch.manual_seed(settings.seed)
        with row_strengths(engine.model, *self.placed), torch.inference_mode():
            if settings.greedy and greedy_loop.serves(engine.model):
                out = greedy_loop.greedy_generate(
                    engine.model,
                    kwargs["input_ids"],
                    kwargs["attention_mask"],
                    max_new_tokens=settings.max_new_tokens,
                    eos_ids=engine.eos_ids,
                    pad_id=engine.pad_id,
                    ignore_eos=settings.ignore_eos,
                    streamer=streamer,
                    stop_event=self.stop_event,
                    keep_logits=keep,
                )
            else:
                out = engine.model.generate(**kwargs)
        if keep:
            engine.kept = KeptRun.of(self.placed, self.prompts, out)
        return out
