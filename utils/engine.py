"""Side-by-side generation: the base (adapter detached) and the fine-tune (adapter attached) from one model.

Both panes run as ONE mixed-adapter batch (peft's `adapter_names`), so the model is held once and the
adapter is "switched" per row rather than per request: nothing is reloaded and no global flag is flipped.
peft installs forward hooks for the duration of a call, so one lock serialises all model use; a request
that waits too long for it is told so rather than left hanging.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from utils.errors import GenerationError, InputError
from utils.loading import ADAPTER_NAME, LoadedPair

BASE = "base"
FINE_TUNED = "fine_tuned"
PANE_LABELS = {BASE: "Base (adapter detached)", FINE_TUNED: "Fine-tuned (adapter attached)"}
MODES = {"base": (BASE,), "fine_tuned": (FINE_TUNED,), "both": (BASE, FINE_TUNED)}
PEFT_BASE_NAME = "__base__"  # peft's name for "no adapter" in adapter_names

MAX_NEW_TOKENS_RANGE = (1, 512)
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.01, 1.0)
SEED_RANGE = (0, 2**32 - 1)
MAX_PROMPT_CHARS = 32_000  # refuse-by-truncation before tokenizing, so a huge paste cannot stall the server
LOCK_TIMEOUT_S = 180.0  # how long a request waits for the model before it is told the app is busy
TOKEN_TIMEOUT_S = 120.0  # longest silence between two tokens before the request is abandoned


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings for one request; build with `checked()` so every value is validated."""

    max_new_tokens: int = 64  # tokens generated per pane at most
    temperature: float = 0.0  # 0 = greedy decoding (deterministic); > 0 samples
    top_p: float = 1.0  # nucleus sampling mass; 1 keeps every token
    seed: int = 0  # seeds torch before sampling, so a sampled run is reproducible
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks compare runs of equal length)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def checked(
        cls, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=0
    ) -> tuple[GenerationSettings, list[str]]:
        """Validated settings plus notices; max_new_tokens is clamped, anything else out of range is refused."""
        notices = []
        n = parse_number("max_new_tokens", max_new_tokens, integer=True)
        lo, hi = MAX_NEW_TOKENS_RANGE
        if not lo <= n <= hi:
            notices.append(f"max_new_tokens {n} was clamped to the range {lo}-{hi}.")
            n = min(max(n, lo), hi)
        t = parse_number("temperature", temperature)
        _require_range("temperature", t, TEMPERATURE_RANGE)
        p = parse_number("top_p", top_p)
        _require_range("top_p", p, TOP_P_RANGE)
        s = parse_number("seed", seed, integer=True)
        _require_range("seed", s, SEED_RANGE)
        return cls(int(n), float(t), float(p), int(s)), notices


def parse_number(name: str, value, integer: bool = False):
    """A finite int or float from a number or numeric text, or an InputError naming the setting.

    Example: parse_number("seed", " 7 ", integer=True) -> 7; parse_number("top_p", "nan") raises
    """
    if isinstance(value, bool) or value is None:
        raise InputError(f"{name} must be a number, not {value!r}.")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InputError(f"{name} must be a number, not {value[:40]!r}.") from None
    if not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a number, not {type(value).__name__}.")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, not {value}.")
    if integer:
        if float(value) != int(value):
            raise InputError(f"{name} must be a whole number, not {value}.")
        return int(value)
    return float(value)


def _require_range(name: str, value, bounds) -> None:
    lo, hi = bounds
    if not lo <= value <= hi:
        raise InputError(f"{name} must be between {lo} and {hi}; got {value}.")


def clean_prompt(prompt) -> tuple[str, list[str]]:
    """The prompt with control characters removed and its size bounded, plus notices of what changed.

    Example: clean_prompt("a\\x00b") -> ("ab", ["Removed 1 control character(s) from the prompt."])
    """
    if not isinstance(prompt, str):
        raise InputError(f"The prompt must be text, not {type(prompt).__name__}.")
    notices = []
    kept = "".join(c for c in prompt if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cs"))
    if len(kept) != len(prompt):
        notices.append(f"Removed {len(prompt) - len(kept)} control character(s) from the prompt.")
    if not kept.strip():
        raise InputError("The prompt is empty: type some text (for the pricer, a product description).")
    if len(kept) > MAX_PROMPT_CHARS:
        notices.append(f"The prompt was cut to its last {MAX_PROMPT_CHARS:,} characters.")
        kept = kept[-MAX_PROMPT_CHARS:]
    return kept, notices


@dataclass
class PaneState:
    """One pane's progress: the tokens so far, their text and timing."""

    key: str  # BASE or FINE_TUNED
    label: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    finish_reason: str | None = None  # "eos", "length" or "stopped"
    first_token_s: float | None = None  # time to first token, from the request's start
    last_token_s: float | None = None

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float | None:
        """Decode rate after the first token (prefill excluded), or None before two tokens exist."""
        if self.tokens < 2 or self.last_token_s is None or self.first_token_s is None:
            return None
        span = self.last_token_s - self.first_token_s
        return (self.tokens - 1) / span if span > 0 else None

    def stats_line(self) -> str:
        rate = f"{self.tokens_per_s:.1f} tok/s" if self.tokens_per_s else "- tok/s"
        ttft = f"{self.first_token_s * 1000:.0f} ms" if self.first_token_s is not None else "-"
        reason = f" | stopped: {self.finish_reason}" if self.done and self.finish_reason else ""
        return f"{self.tokens} tokens | {rate} | first token {ttft}{reason}"


@dataclass
class StreamUpdate:
    """What the UI redraws after each step: every pane's state, notices, and whether the run is over."""

    panes: dict[str, PaneState]
    notices: list[str]
    prompt_tokens: int
    finished: bool = False

    def text(self, key: str) -> str:
        return self.panes[key].text if key in self.panes else ""


@dataclass(frozen=True)
class NextTokenView:
    """The top next tokens after the prompt for one pane (for the bar chart and the top-K price)."""

    key: str
    tokens: list[str]  # decoded text of each candidate
    token_ids: list[int]
    probabilities: list[float]
    logits: torch.Tensor  # full next-token logits (float32, cpu), for price estimates


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two outputs differ, or None when they are equal.

    Example: first_divergence([1, 2, 3], [1, 5]) -> 1; first_divergence([1, 2], [1, 2]) -> None
    """
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


class _StopOnEvent(StoppingCriteria):
    """Ends generation for every row once the event is set (Stop button, disconnect, timeout)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class _RowStreamer:
    """transformers' streamers accept one row; this one hands each step's tokens for all rows to a queue."""

    def __init__(self, out: queue.Queue):
        self.out = out
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first sends the prompt ids
            self.prompt_seen = True
            return
        self.out.put(("tokens", value.reshape(-1).tolist()))

    def end(self) -> None:
        self.out.put(("end", None))


class AdapterRouter:
    """Chooses, per batch row, base or adapter for every LoRA layer, with one attribute write per request.

    peft's own switches cost milliseconds per call because they walk every module (`disable_adapter()` flips
    a flag on each LoRA layer; `generate(adapter_names=...)` registers and removes a hook on each). Here a
    pre-forward hook is registered once per LoRA layer and reads `self.rows`, so switching is a list
    assignment. Only the engine, holding its lock, sets `rows`; None leaves the layers as peft has them.
    """

    def __init__(self, model):
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        self.rows: list[str] | None = None
        self.layers = [m for m in model.modules() if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))]
        self._handles = [m.register_forward_pre_hook(self._inject, with_kwargs=True) for m in self.layers]

    def _inject(self, module, args, kwargs):
        if self.rows is not None:
            kwargs["adapter_names"] = self.rows
        return args, kwargs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class Engine:
    """Generation over the one loaded model, serialised by a lock, with both panes in one batch."""

    def __init__(
        self,
        pair: LoadedPair,
        lock_timeout_s: float = LOCK_TIMEOUT_S,
        token_timeout_s: float = TOKEN_TIMEOUT_S,
    ):
        self.pair = pair
        self.model = pair.model
        self.tokenizer = pair.tokenizer
        # The lock and the routing hooks belong to the model, not to this Engine: two engines over one model
        # (tests, an app rebuilt around a loaded pair) must still serialise and must not stack hooks.
        shared = getattr(self.model, "_lora_lens_shared", None)
        if shared is None:
            shared = {
                "lock": threading.Lock(),
                "router": AdapterRouter(self.model) if pair.has_adapter else None,
            }
            self.model._lora_lens_shared = shared
        self.lock = shared["lock"]
        self.lock_timeout_s = lock_timeout_s
        self.token_timeout_s = token_timeout_s
        config = getattr(self.model, "config", None)
        self.context_length = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        )
        self.router = shared["router"]

    @property
    def has_adapter(self) -> bool:
        return self.pair.has_adapter

    def panes_for(self, mode: str) -> tuple[str, ...]:
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
        panes = MODES[mode]
        if FINE_TUNED in panes and not self.has_adapter:
            raise InputError("No adapter is loaded, so there is no fine-tuned pane: choose 'base'.")
        return panes

    def encode(self, prompt: str, max_new_tokens: int) -> tuple[list[int], list[str]]:
        """Token ids of the prompt (special tokens kept as plain text), cut from the left to fit the context."""
        ids = self.tokenizer(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        notices = []
        limit = self.context_length - max_new_tokens
        if len(ids) > limit:
            notices.append(
                f"The prompt has {len(ids):,} tokens; the model's context is {self.context_length:,}, so the "
                f"first {len(ids) - limit:,} were dropped."
            )
            ids = ids[-limit:]
        return ids, notices

    def _route(self, panes: tuple[str, ...] | None) -> None:
        """Point each batch row at base or adapter (call with the lock held); None restores peft's default."""
        if self.router is not None:
            self.router.rows = (
                None if panes is None else [PEFT_BASE_NAME if p == BASE else ADAPTER_NAME for p in panes]
            )

    def _acquire(self) -> None:
        if not self.lock.acquire(timeout=self.lock_timeout_s):
            raise GenerationError(
                f"The model is busy with other requests; waited {self.lock_timeout_s:.0f} s. Try again."
            )

    @contextmanager
    def exclusive(self):
        """Hold the model for work outside the engine (evaluation calls generate itself); yields the model."""
        self._acquire()
        try:
            yield self.model
        finally:
            self.lock.release()

    def stream(
        self,
        prompt: str,
        mode: str = "both",
        settings: GenerationSettings | None = None,
        stop_event: threading.Event | None = None,
    ) -> Iterator[StreamUpdate]:
        """Yield the panes' state after every generated token; the last update has finished=True.

        Closing the iterator early (a client that went away) stops generation and frees the model.
        """
        settings = settings or GenerationSettings()
        panes = self.panes_for(mode)
        prompt, notices = clean_prompt(prompt)
        ids, more = self.encode(prompt, settings.max_new_tokens)
        notices += more
        stop_event = stop_event or threading.Event()
        started = time.perf_counter()
        states = {key: PaneState(key, PANE_LABELS[key]) for key in panes}
        tokens: queue.Queue = queue.Queue()
        errors: list[BaseException] = []
        self._acquire()
        worker = threading.Thread(
            target=self._generate_locked,
            args=(ids, panes, settings, stop_event, tokens, errors),
            name="lora-lens-generate",
            daemon=True,
        )
        try:
            worker.start()
        except BaseException:
            self.lock.release()
            raise
        finished = False
        try:
            yield StreamUpdate(states, list(notices), len(ids))
            while True:
                try:
                    kind, row_tokens = tokens.get(timeout=self.token_timeout_s)
                except queue.Empty:
                    stop_event.set()
                    raise GenerationError(
                        f"Generation produced nothing for {self.token_timeout_s:.0f} s and was stopped."
                    ) from None
                if kind == "end":
                    break
                now = time.perf_counter() - started
                for key, token in zip(panes, row_tokens, strict=True):
                    self._advance(states[key], token, now)
                yield StreamUpdate(states, list(notices), len(ids))
            worker.join(timeout=self.token_timeout_s)
            if errors:
                raise _as_generation_error(errors[0])
            for state in states.values():
                if not state.done:
                    state.done = True
                    state.finish_reason = "stopped" if stop_event.is_set() else "length"
            finished = True
            yield StreamUpdate(states, list(notices), len(ids), finished=True)
        finally:
            if not finished:
                stop_event.set()  # the consumer left: end generation so the lock is released promptly

    def _advance(self, state: PaneState, token: int, now: float) -> None:
        if state.done:
            return
        if token in self.eos_ids:
            state.done, state.finish_reason = True, "eos"
            return
        state.token_ids.append(token)
        if state.first_token_s is None:
            state.first_token_s = now
        state.last_token_s = now
        state.text = self.tokenizer.decode(state.token_ids, skip_special_tokens=True)

    def _generate_locked(self, ids, panes, settings, stop_event, out: queue.Queue, errors: list) -> None:
        """Runs in the worker thread, which owns the lock until generation ends."""
        try:
            self._generate(ids, panes, settings, stop_event, _RowStreamer(out))
        except BaseException as exc:  # reported to the consumer; the thread itself must not die silently
            errors.append(exc)
            out.put(("end", None))
        finally:
            self.lock.release()

    def _generate(self, ids, panes, settings: GenerationSettings, stop_event, streamer) -> torch.Tensor:
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids] * len(panes), dtype=torch.long, device=device)
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=settings.max_new_tokens,
            min_new_tokens=settings.max_new_tokens if settings.ignore_eos else 0,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop_event)]),
        )
        if settings.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=None)
            torch.manual_seed(settings.seed)
        self._route(panes)
        try:
            with torch.inference_mode():
                return self.model.generate(**kwargs)
        finally:
            self._route(None)

    def run(
        self, prompt: str, mode: str = "both", settings: GenerationSettings | None = None
    ) -> StreamUpdate:
        """The final state of a whole generation (no streaming)."""
        updates = self.stream(prompt, mode, settings)
        last = next(updates)
        for last in updates:  # noqa: B007 - only the final state is wanted
            pass
        return last

    def next_token_views(self, prompt: str, mode: str = "both", top: int = 10) -> dict[str, NextTokenView]:
        """The most likely next tokens after the prompt for each pane, from one forward pass."""
        panes = self.panes_for(mode)
        prompt, _ = clean_prompt(prompt)
        ids, _ = self.encode(prompt, 1)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids] * len(panes), dtype=torch.long, device=device)
        kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        self._acquire()
        try:
            self._route(panes)
            with torch.inference_mode():
                logits = self.model(**kwargs).logits[:, -1].float().cpu()
        except Exception as exc:
            raise _as_generation_error(exc) from exc
        finally:
            self._route(None)
            self.lock.release()
        views = {}
        for row, key in enumerate(panes):
            probs = torch.softmax(logits[row], dim=-1)
            p, idx = probs.topk(top)
            token_ids = idx.tolist()
            views[key] = NextTokenView(
                key=key,
                tokens=[self.tokenizer.decode([t]) for t in token_ids],
                token_ids=token_ids,
                probabilities=p.tolist(),
                logits=logits[row],
            )
        return views


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    return [int(i) for i in ids if i is not None] or [0]


def _as_generation_error(exc: BaseException) -> GenerationError:
    if isinstance(exc, GenerationError):
        return exc
    if isinstance(exc, InputError):
        return GenerationError(str(exc))
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "out of memory" in text:
        return GenerationError("Generation ran out of memory: try fewer new tokens or a shorter prompt.")
    return GenerationError(
        f"Generation failed ({type(exc).__name__}); the model is free again, try once more."
    )
