"""Generation over one model in which every batch row carries its own adapter strength.

A LoRA layer's output is `base(x) + s · (alpha / r) · B A x`; the engine sets `s` per row (0 = the base,
1 = the fine-tune, anything in [-2, 3] between and beyond), and per layer where an ablation asks for it. So
the base and fine-tune panes, a strength sweep, or teacher-forced scoring all run as ONE batch over ONE model
and ONE adapter copy: nothing is reloaded and no global flag is flipped. One lock serialises all model use;
a request that waits too long for it is told so rather than left hanging.
"""

from __future__ import annotations

import functools
import math
import queue
import threading
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from utils import nf4_kernel
from utils.errors import GenerationError, InputError
from utils.loading import ADAPTER_NAME, LoadedPair

BASE = "base"
FINE_TUNED = "fine_tuned"
PANE_LABELS = {BASE: "Base (adapter detached)", FINE_TUNED: "Fine-tuned (adapter attached)"}
MODES = {"base": (BASE,), "fine_tuned": (FINE_TUNED,), "both": (BASE, FINE_TUNED)}

MAX_NEW_TOKENS_RANGE = (1, 512)
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.01, 1.0)
SEED_RANGE = (0, 2**32 - 1)
MAX_PROMPT_CHARS = 32_000  # refuse-by-truncation before tokenizing, so a huge paste cannot stall the server
LOCK_TIMEOUT_S = 180.0  # how long a request waits for the model before it is told the app is busy
TOKEN_TIMEOUT_S = 120.0  # longest silence between two tokens before the request is abandoned
STRENGTH_RANGE = (-2.0, 3.0)  # adapter strength s: 0 = base, 1 = fine-tune, < 0 subtracts the update
MAX_SWEEP_ROWS = 6  # strengths in one sweep (one batch row each)


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


@contextmanager
def torch_threads(threads: int):
    """This thread's torch CPU work on `threads` threads (0: as it is), the count restored after.

    Only for threads that end with the work, and only for this thread (threads started meanwhile keep the
    default, one in the app: app.py sets OMP_NUM_THREADS=1). libgomp keeps a thread's OpenMP team alive as
    long as the thread, and while two teams are alive in a process on a 2-core machine it stops spinning
    between parallel regions, so every one of a decode step's few hundred small kernels waits for its helper
    threads to wake (measured: 2 threads in a worker thread beside a 2-thread main thread, 34 ms a step; 1
    thread, 22 ms; 2 threads with the main thread at 1, 17 ms).
    """
    if threads <= 0:
        yield
        return
    set_count = nf4_kernel.set_thread_count
    previous = set_count(threads)
    if previous is None:
        # Without the compiled library: torch's own call, which also sets the default of threads started meanwhile.
        set_count, previous = torch.set_num_threads, torch.get_num_threads()
        set_count(threads)
    try:
        yield
    finally:
        set_count(previous)


def in_own_thread(threads: int, work):
    """`work()` in a thread of its own on `threads` torch threads (see torch_threads); its result or error."""
    if threads <= 0:
        return work()
    outcome: dict = {}

    def target():
        try:
            with torch_threads(threads):
                outcome["result"] = work()
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="lora-lens-forward", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class _NoEndOfSequence(LogitsProcessor):
    """Rules out the end-of-sequence tokens (`ignore_eos`): what `min_new_tokens` does, without the vocabulary-
    wide mask it builds on every step (about half a millisecond a step on a CPU, for 49,152 tokens)."""

    def __init__(self, eos_ids: list[int]):
        self.eos_ids = list(eos_ids)

    def __call__(self, input_ids, scores):
        scores[:, self.eos_ids] = -math.inf  # generate hands each step a fresh copy of the logits
        return scores


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


class StrengthRouter:
    """Every LoRA layer computes `base(x) + s · (alpha / r) · B A x` with `s` set per batch row (and per layer).

    peft can only switch an adapter on or off per row (`adapter_names`), and does it by splitting the batch in
    every layer; its global `scaling` cannot differ between rows. Here each LoRA linear layer's forward is
    replaced once, at start, by one that adds its low-rank update times a per-row factor, so base (s = 0),
    fine-tune (s = 1) and any other strength share one batched pass, and choosing the strengths for a request
    is one attribute write. Only the engine, holding its lock, sets a plan; with no plan (None) every layer
    runs peft's own forward, so peft's API keeps working on the model.
    """

    def __init__(self, model, adapter_name: str = ADAPTER_NAME):
        from peft.tuners.lora import LoraLayer

        self.adapter_name = adapter_name
        self.names: list[str] = []
        self.layers: list = []
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {}):
                _check_scalable(name, module, adapter_name)
                self.names.append(name)
                self.layers.append(module)
        self.scalings = [float(m.scaling[adapter_name]) for m in self.layers]
        # per layer: (base layer, lora_A, lora_B, dropout), looked up once instead of in every call
        self.parts = [
            (m.base_layer, m.lora_A[adapter_name], m.lora_B[adapter_name], m.lora_dropout[adapter_name])
            for m in self.layers
        ]
        self.plan: _Plan | None = None
        for index, layer in enumerate(self.layers):
            layer.forward = functools.partial(self._forward, index, layer, layer.forward)
            # (router, position in a plan's per-layer lists): how the compiled decode layer
            # (utils/decode_layers.py) finds the plan for the LoRA layers it meets
            layer.__dict__["_lora_lens_route"] = (self, index)

    def plan_for(self, rows: list) -> _Plan:
        """A plan for a batch: each row is one strength for every layer, or a list of one per layer (in
        the order of `self.names`). Call with the model's lock held, then set `self.plan`.

        Example: plan_for([0.0, 1.0]) -> base in row 0, fine-tune in row 1 (s · alpha / r per layer)
        """
        n = len(self.layers)
        per_row = [[float(s)] * n if isinstance(s, (int, float)) else [float(v) for v in s] for s in rows]
        if any(len(row) != n for row in per_row):
            raise InputError(f"A per-layer strength list needs {n} values, one per LoRA layer.")
        # [layers, rows] of s x alpha / r, built in Python: a request pays one tensor creation, not one per layer
        factors = [[row[i] * scaling for row in per_row] for i, scaling in enumerate(self.scalings)]
        active = [any(f != 0 for f in layer) for layer in factors]
        weight = self.layers[0].lora_A[self.adapter_name].weight if self.layers else None
        device = weight.device if weight is not None else "cpu"
        dtype = weight.dtype if weight is not None else torch.float32
        factors = (
            torch.tensor(factors, dtype=torch.float64).reshape(n, len(rows)).to(dtype=dtype, device=device)
        )
        fused = [
            self._fused_call(parts) if on else None for parts, on in zip(self.parts, active, strict=True)
        ]
        return _Plan(len(rows), factors.unbind(0), active, fused)

    @staticmethod
    def _fused_call(parts):
        """(call, lora_A weight, lora_B weight) where the base layer's CPU 4-bit kernel adds the update in the
        same call (utils/nf4_kernel.py: `lora_lens_with_update`), else None."""
        base, lora_A, lora_B, dropout = parts
        call = base.__dict__.get("lora_lens_with_update")
        # the parameter dicts, not Module.__getattr__: a request builds this for every LoRA layer
        a, b = lora_A._parameters, lora_B._parameters
        if call is None or dropout.training or a.get("bias") is not None or b.get("bias") is not None:
            return None
        return call, a["weight"], b["weight"]

    def _forward(self, index, layer, peft_forward, x, *args, **kwargs):
        plan = self.plan
        if plan is None or "adapter_names" in kwargs:
            return peft_forward(x, *args, **kwargs)
        base_layer, lora_A, lora_B, dropout = self.parts[index]
        if not plan.active[index]:  # every row has strength 0 here: the update would add zeros
            return base_layer(x, *args, **kwargs)
        if x.shape[0] != plan.rows:
            raise GenerationError(f"The strength plan has {plan.rows} rows but the batch has {x.shape[0]}.")
        fused = plan.fused[index]
        if fused is not None and not (args or kwargs):
            # The same arithmetic in one kernel call, or None where the kernel does not serve this input.
            result = fused[0](x, fused[1], fused[2], plan.factors[index])
            if result is not None:
                return result
        # peft's own arithmetic (B(A(dropout(x))) * factor, then added), with the modules' weights called
        # directly: a decode step runs this in every LoRA layer, where module calls cost more than the math.
        result = base_layer(x, *args, **kwargs)
        if x.dtype != lora_A.weight.dtype:
            x = x.to(lora_A.weight.dtype)
        if dropout.training:
            x = dropout(x)
        update = F.linear(F.linear(x, lora_A.weight, lora_A.bias), lora_B.weight, lora_B.bias)
        update.mul_(plan.factors[index].view(-1, *([1] * (x.dim() - 1))))
        if update.dtype != result.dtype:
            update = update.to(result.dtype)
        return result.add_(update) if not result.requires_grad else result + update


@dataclass(frozen=True)
class _Plan:
    rows: int  # batch rows the plan is for
    factors: tuple  # per layer, [rows] of strength x alpha / r in the LoRA weights' dtype and device
    active: list[bool]  # per layer: does any row have a non-zero strength there
    fused: list  # per layer: (kernel call, lora_A weight, lora_B weight) where the CPU kernel adds the update


def _check_scalable(name: str, module, adapter_name: str) -> None:
    """Only plain LoRA on linear layers has the `B A x` form that a per-row factor scales."""
    import torch.nn as nn

    if adapter_name in getattr(module, "lora_variant", {}) or not isinstance(
        module.lora_A[adapter_name], nn.Linear
    ):
        raise InputError(
            f"The adapter's layer {name} is not a plain LoRA linear layer (DoRA, embedding or convolution "
            "adapters are not supported): LoRA Lens scales B A x per row."
        )


def strength_router(model) -> StrengthRouter | None:
    """The model's one router and lock, made on first use (None for the router when no adapter is attached)."""
    shared = _shared(model)
    return shared["router"]


def _shared(model) -> dict:
    # The lock and the router belong to the model, not to an Engine: two engines over one model (tests, an
    # app rebuilt around a loaded pair) must still serialise and must not wrap the layers twice.
    shared = getattr(model, "_lora_lens_shared", None)
    if shared is None:
        has_adapter = hasattr(model, "peft_config") and ADAPTER_NAME in model.peft_config
        shared = {"lock": threading.Lock(), "router": StrengthRouter(model) if has_adapter else None}
        model._lora_lens_shared = shared
    return shared


@contextmanager
def row_strengths(model, rows: list):
    """Run the model with these per-row strengths (the caller holds the model's lock); restores peft after.

    Example: with row_strengths(model, [0, 1]): model.generate(...)  # row 0 base, row 1 fine-tuned
    """
    router = strength_router(model)
    if router is None:
        if any(_nonzero(s) for s in rows):
            raise InputError("No adapter is loaded (base-only): every strength must be 0.")
        yield
        return
    router.plan = router.plan_for(rows)
    try:
        yield
    finally:
        router.plan = None


def _nonzero(strength) -> bool:
    return (
        any(float(v) != 0 for v in strength) if isinstance(strength, (list, tuple)) else float(strength) != 0
    )


@dataclass(frozen=True)
class Row:
    """One batch row: which pane it feeds and the adapter strength it runs at.

    `strength` is one number for every LoRA layer (0 = base, 1 = fine-tune) or a tuple of one per LoRA layer
    in the router's order (ablation: 0 on the layers switched off).
    """

    key: str
    label: str
    strength: float | tuple[float, ...]


def check_strength(value, name: str = "strength") -> float:
    """A strength in STRENGTH_RANGE, from a number or numeric text. Example: check_strength("0.5") -> 0.5"""
    s = parse_number(name, value)
    _require_range(name, s, STRENGTH_RANGE)
    return s


def parse_strengths(text) -> list[float]:
    """A sweep's strengths from "0, 0.5, 1" (commas or spaces), 1 to MAX_SWEEP_ROWS values, each in range.

    Example: parse_strengths("0,0.5 1") -> [0.0, 0.5, 1.0]
    """
    if isinstance(text, (list, tuple)):
        parts = list(text)
    elif isinstance(text, str):
        parts = [p for p in text.replace(",", " ").split() if p]
    else:
        raise InputError(f'strengths must be text such as "0, 0.5, 1", not {type(text).__name__}.')
    if not parts:
        raise InputError('strengths is empty: give 1 to 6 numbers, such as "0, 0.5, 1, 1.5, 2".')
    if len(parts) > MAX_SWEEP_ROWS:
        raise InputError(f"At most {MAX_SWEEP_ROWS} strengths in one sweep; got {len(parts)}.")
    return [check_strength(p, f"strength {i + 1}") for i, p in enumerate(parts)]


def strength_label(strength: float) -> str:
    """The label of a strength. Example: strength_label(0.5) -> "s = 0.5"; strength_label(1.0) -> "s = 1"."""
    return f"s = {strength:g}"


class Engine:
    """Generation over the one loaded model, serialised by a lock, with every pane a row of one batch."""

    def __init__(
        self,
        pair: LoadedPair,
        lock_timeout_s: float = LOCK_TIMEOUT_S,
        token_timeout_s: float = TOKEN_TIMEOUT_S,
    ):
        self.pair = pair
        self.model = pair.model
        self.tokenizer = pair.tokenizer
        shared = _shared(self.model)
        self.lock = shared["lock"]
        self.router: StrengthRouter | None = shared["router"]
        self.lock_timeout_s = lock_timeout_s
        self.token_timeout_s = token_timeout_s
        config = getattr(self.model, "config", None)
        self.context_length = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        # generation and forward_rows run in threads of their own, on this many CPU threads (0 on the GPU)
        self.threads = getattr(pair.report, "cpu_threads", 0)
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        )

    @property
    def has_adapter(self) -> bool:
        return self.pair.has_adapter and self.router is not None

    def panes_for(self, mode: str) -> tuple[str, ...]:
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
        panes = MODES[mode]
        if FINE_TUNED in panes and not self.has_adapter:
            raise InputError("No adapter is loaded, so there is no fine-tuned pane: choose 'base'.")
        return panes

    def rows_for(self, mode: str, strength=1.0) -> list[Row]:
        """The rows of a Compare run: the base at s = 0, the fine-tune at `strength` (1 = as trained)."""
        strength = check_strength(strength)
        rows = []
        for key in self.panes_for(mode):
            if key == BASE:
                rows.append(Row(BASE, PANE_LABELS[BASE], 0.0))
            else:
                label = (
                    PANE_LABELS[FINE_TUNED] if strength == 1 else f"Fine-tuned ({strength_label(strength)})"
                )
                rows.append(Row(FINE_TUNED, label, strength))
        return rows

    def sweep_rows(self, strengths: list[float]) -> list[Row]:
        """One row per strength, keyed by position (a strength may repeat), labelled "s = ..."."""
        if not self.has_adapter and any(s != 0 for s in strengths):
            raise InputError("No adapter is loaded (base-only), so only strength 0 exists.")
        return [Row(f"s{i}", strength_label(s), float(s)) for i, s in enumerate(strengths)]

    def encode(self, prompt: str, max_new_tokens: int) -> tuple[list[int], list[str]]:
        """Token ids of the prompt, cut from the left to fit the context. Special tokens typed in the prompt stay
        plain text; the tokenizer's own BOS is added where it has one (Llama 3.1's <|begin_of_text|>, as the
        pricer was trained and served; SmolLM2 adds none)."""
        ids = self.tokenizer(prompt, add_special_tokens=True, split_special_tokens=True)["input_ids"]
        notices = []
        limit = self.context_length - max_new_tokens
        if len(ids) > limit:
            notices.append(
                f"The prompt has {len(ids):,} tokens; the model's context is {self.context_length:,}, so the "
                f"first {len(ids) - limit:,} were dropped."
            )
            ids = ids[-limit:]
        return ids, notices

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
        strength=1.0,
    ) -> Iterator[StreamUpdate]:
        """The Compare panes (base at s = 0, fine-tune at `strength`) streamed from one batch."""
        return self.stream_rows(prompt, self.rows_for(mode, strength), settings, stop_event)

    def stream_rows(
        self,
        prompt: str,
        rows: list[Row],
        settings: GenerationSettings | None = None,
        stop_event: threading.Event | None = None,
    ) -> Iterator[StreamUpdate]:
        """Yield every row's state after each generated token; the last update has finished=True.

        Closing the iterator early (a client that went away) stops generation and frees the model.
        """
        settings = settings or GenerationSettings()
        prompt, notices = clean_prompt(prompt)
        ids, more = self.encode(prompt, settings.max_new_tokens)
        notices += more
        return self._stream(ids, rows, settings, stop_event or threading.Event(), notices)

    def _stream(self, ids, rows, settings, stop_event, notices) -> Iterator[StreamUpdate]:
        keys = [row.key for row in rows]
        started = time.perf_counter()
        states = {row.key: PaneState(row.key, row.label) for row in rows}
        tokens: queue.Queue = queue.Queue()
        errors: list[BaseException] = []
        self._acquire()
        worker = threading.Thread(
            target=self._generate_locked,
            args=(ids, rows, settings, stop_event, tokens, errors),
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
                for key, token in zip(keys, row_tokens, strict=True):
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

    def _generate_locked(self, ids, rows, settings, stop_event, out: queue.Queue, errors: list) -> None:
        """Runs in the worker thread, which owns the lock until generation ends."""
        try:
            with torch_threads(self.threads):
                self._generate(ids, rows, settings, stop_event, _RowStreamer(out))
        except BaseException as exc:  # reported to the consumer; the thread itself must not die silently
            errors.append(exc)
            out.put(("end", None))
        finally:
            self.lock.release()

    def _generate(self, ids, rows, settings: GenerationSettings, stop_event, streamer) -> torch.Tensor:
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids] * len(rows), dtype=torch.long, device=device)
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=settings.max_new_tokens,
            logits_processor=LogitsProcessorList(
                [_NoEndOfSequence(self.eos_ids)] if settings.ignore_eos else []
            ),
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
        with row_strengths(self.model, [row.strength for row in rows]), torch.inference_mode():
            return self.model.generate(**kwargs)

    def run(
        self, prompt: str, mode: str = "both", settings: GenerationSettings | None = None, strength=1.0
    ) -> StreamUpdate:
        """The final state of a whole Compare generation (no streaming)."""
        return self.run_rows(prompt, self.rows_for(mode, strength), settings)

    def run_rows(
        self, prompt: str, rows: list[Row], settings: GenerationSettings | None = None
    ) -> StreamUpdate:
        """The final state of a whole generation of these rows (no streaming)."""
        updates = self.stream_rows(prompt, rows, settings)
        last = next(updates)
        for last in updates:  # noqa: B007 - only the final state is wanted
            pass
        return last

    def forward_rows(self, sequences: list[list[int]], strengths: list, keep_from: int = 0) -> torch.Tensor:
        """Teacher-forced logits: one forward pass over right-padded rows, each at its own strength.

        Returns float32 logits on the CPU, [rows, longest - keep_from, vocab]: position j predicts the token at
        keep_from + j + 1. Right padding keeps every row's positions as in an unpadded run; pads come after the
        real tokens, so the causal mask hides them from every real position.
        """
        width = max(len(seq) for seq in sequences)
        device = next(self.model.parameters()).device
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[i, : len(seq)] = 1

        def forward():
            with row_strengths(self.model, list(strengths)), torch.inference_mode():
                out = self.model(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    logits_to_keep=width - keep_from,
                )
                return out.logits.float().cpu()

        self._acquire()
        try:
            return in_own_thread(self.threads, forward)
        except InputError:
            raise
        except Exception as exc:
            raise _as_generation_error(exc) from exc
        finally:
            self.lock.release()

    def next_token_views(
        self, prompt: str, mode: str = "both", top: int = 10, strength=1.0
    ) -> dict[str, NextTokenView]:
        """The most likely next tokens after the prompt for each pane, from one forward pass."""
        return self.next_token_views_rows(prompt, self.rows_for(mode, strength), top)

    def next_token_views_rows(self, prompt: str, rows: list[Row], top: int = 10) -> dict[str, NextTokenView]:
        prompt, _ = clean_prompt(prompt)
        ids, _ = self.encode(prompt, 1)
        logits = self.forward_rows([ids] * len(rows), [row.strength for row in rows], keep_from=len(ids) - 1)
        views = {}
        for i, row in enumerate(rows):
            probs = torch.softmax(logits[i, -1], dim=-1)
            p, idx = probs.topk(top)
            token_ids = idx.tolist()
            views[row.key] = NextTokenView(
                key=row.key,
                tokens=[self.tokenizer.decode([t]) for t in token_ids],
                token_ids=token_ids,
                probabilities=p.tolist(),
                logits=logits[i, -1],
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
