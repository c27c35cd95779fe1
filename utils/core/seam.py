"""The seam between the views and whatever runs the model: `Backend`, and the plain values that cross it.

A view asks a Backend to stream rows of one batch (each row a pane at its own adapter strength), to score
token sequences teacher-forced, for the next-token candidates after a prompt, or to run a chunk of an
evaluation. Only plain values cross (lists of ids and probabilities, never tensors of the whole vocabulary),
so the same contract holds in-process, in a ZeroGPU worker across a pickle, and over HTTP to a serving
engine. `utils.runtime.engine.Engine` is the in-process implementation; a new engine subclasses Backend,
writes the abstract methods and states what it can do in its `BackendInfo`.

Contracts, one line each (s = a row's adapter strength; 0 = base, 1 = fine-tune; each row names its adapter,
by default the primary one, "fine_tuned"):
    stream_rows: row i continues its prompt under  base(x) + s_i · (alpha_i / r_i) · B_i A_i x
    score_rows:  scores[i].logprobs[j] = log p_{s_i}(seq_i[k_i + j + 1] | seq_i[: k_i + j + 1]), k_i = keep_from
                 (one number for every row, or one per row)
    next_tokens: views[row.key] = the top_k (token, p) of p_{s_row}(· | its prompt)
A row's prompt is `prompt` encoded (Backend.encode), unless the row carries its own token ids (`prompt_ids`:
the prompt rendered in that pane's format, utils/core/prompt_format.py); rows of different lengths are
left-padded in one batch.

Long because it is the whole contract in one place: every value that crosses and every method a backend
writes, each with its docstring.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from utils.core.errors import InputError
from utils.core.inputs import (
    MAX_NEW_TOKENS_RANGE,
    SEED_RANGE,
    TEMPERATURE_RANGE,
    TOP_P_RANGE,
    check_strength,
    parse_number,
    require_range,
)

BASE = "base"
FINE_TUNED = "fine_tuned"
PANE_LABELS = {BASE: "Base (adapter detached)", FINE_TUNED: "Fine-tuned (adapter attached)"}
MODES = {"base": (BASE,), "fine_tuned": (FINE_TUNED,), "both": (BASE, FINE_TUNED)}


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings for one request; build with `checked()` so every value is validated."""

    max_new_tokens: int = 64  # tokens generated per pane at most
    temperature: float = 0.0  # 0 = greedy decoding (deterministic); > 0 samples
    top_p: float = 1.0  # nucleus sampling mass; 1 keeps every token
    seed: int = 0  # seeds torch before sampling, so a sampled run is reproducible
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks compare runs of equal length)
    # keep the run's logits and cache for a teacher-forced scoring of its texts right after (the token lens):
    # a backend that can reuses them (Backend.release_kept_run frees them); set by the views, not by visitors
    keep_for_scoring: bool = False

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
        require_range("temperature", t, TEMPERATURE_RANGE)
        p = parse_number("top_p", top_p)
        require_range("top_p", p, TOP_P_RANGE)
        s = parse_number("seed", seed, integer=True)
        require_range("seed", s, SEED_RANGE)
        return cls(int(n), float(t), float(p), int(s)), notices


@dataclass(frozen=True)
class Row:
    """One batch row: which pane it feeds, the adapter it runs and that adapter's strength.

    `strength` is one number for every LoRA layer (0 = base, 1 = fine-tune) or a tuple of one per LoRA layer
    in the order of `BackendInfo.lora_layers` (ablation: 0 on the layers switched off). `adapter` is a name of
    `BackendInfo.adapters`, FINE_TUNED for the primary one, or None for the base. `prompt_ids`, where set, is
    the row's own prompt as token ids (its pane's prompt format), in place of the shared prompt.
    """

    key: str
    label: str
    strength: float | tuple[float, ...]
    adapter: str | None = FINE_TUNED
    prompt_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Use:
    """A row of a teacher-forced pass or an evaluation: an adapter by name (None = the base) at a strength.
    Where those take a bare number (or per-layer tuple), it is the primary adapter's strength."""

    adapter: str | None = FINE_TUNED
    strength: float | tuple[float, ...] = 1.0


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

    def add(self, token: int, now: float, end_ids) -> bool:
        """One generated token, `now` seconds into the run: appended, or the pane finished by an end-of-sequence
        id (not kept). False when nothing was appended, so the caller knows whether to decode the text again."""
        if self.done:
            return False
        if token in end_ids:
            self.done, self.finish_reason = True, "eos"
            return False
        self.token_ids.append(token)
        if self.first_token_s is None:
            self.first_token_s = now
        self.last_token_s = now
        return True

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
    """The most likely next tokens after the prompt for one row, most likely first."""

    key: str
    tokens: list[str]  # decoded text of each candidate
    token_ids: list[int]
    probabilities: list[float]  # from the softmax over the whole vocabulary

    def probability_of(self, token_id: int) -> float:
        """A candidate's probability; 0 for a token outside the top (below the last one listed)."""
        try:
            return self.probabilities[self.token_ids.index(token_id)]
        except ValueError:
            return 0.0


@dataclass(frozen=True)
class SequenceScores:
    """Teacher-forced scores of one row: position j is about token keep_from + j + 1 of its sequence."""

    logprobs: list[float]  # natural-log probability of the token that is there
    top: list[list[tuple[int, float]]]  # per position, the top_k (token id, probability), most likely first


@dataclass(frozen=True)
class Scores:
    """score_rows' result: one SequenceScores per row, and KL(row a || row b) per position for asked pairs."""

    rows: list[SequenceScores]
    kl: dict[tuple[int, int], list[float]]
    # where KL comes from a server's top k (BackendInfo.exact_kl False): per pair and position, row a's
    # probability outside the tokens both rows list, the part of the distribution that KL could not see
    unseen: dict[tuple[int, int], list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkAnswer:
    """One row of an evaluation chunk: its greedy text and the next-token candidates after its prompt."""

    text: str
    first: NextTokenView


@dataclass(frozen=True)
class LoraWeights:
    """One adapted layer as the anatomy reads it: ΔW = scaling · B A, and its base weight W on request."""

    name: str  # the layer's module name, e.g. "base_model.model.model.layers.0.self_attn.q_proj"
    a: object  # lora_A's weight, [r, in] (a tensor of the backend's framework)
    b: object  # lora_B's weight, [out, r]
    scaling: float  # alpha / r
    base_weight: Callable[[], object]  # W in float32, de-quantized for this layer only when called
    # the values a weight takes once stored in this layer's 4-bit format (None where the layer is not 4-bit)
    requantize: Callable[[object], object] | None = None
    # the base's own full-precision weight of this layer (its checkpoint before quantizing), or None
    original_weight: Callable[[], object] | None = None


@dataclass(frozen=True)
class MergedRuns:
    """What a copy of the model with an adapter merged into its weights does, against the unmerged adapter on
    the served base (Backend.merged_runs)."""

    route: str  # how it was merged (utils/runtime/merging.py: nf4, bf16, fp16, fp32, original)
    kl: list[list[float]]  # per sequence and scored position: KL(unmerged || merged), nats
    logprob_change: list[list[float]]  # the same positions: log p_merged - log p_unmerged of the token there
    texts: list[str]  # the merged model's greedy continuation of each prompt
    bytes_needed: int  # memory the merged copy takes
    refused: str = ""  # why this copy was not built (it would not fit, or the weights are not here); else ""


@dataclass(frozen=True)
class BackendInfo:
    """What a backend runs and can do; views check it before asking."""

    name: str  # which engine, for the header and messages
    has_adapter: bool
    lora_layers: tuple[str, ...] = ()  # names of the adapted layers, the order of per-layer strengths
    per_row_strength: bool = True  # any strength per row (else only 0 and 1)
    per_layer_strength: bool = True  # a tuple of strengths per row (ablation)
    max_top_k: int = 1000  # candidates per position score_rows and next_tokens can return
    context_length: int = 2048
    n_layers: int = 0  # decoder layers of the base
    inspectable: bool = False  # exclusive() and adapter_weights() hand out the model and its weights
    # every loaded adapter, the primary first: {"name", "source", "r", "alpha", "targets", "parameters",
    # "file_bytes", "footprint_bytes", "stored", "step", "primary"}; () when base-only
    adapters: tuple[dict, ...] = ()
    # KL over the whole vocabulary; False where a server returns only its top k (a lower bound, Scores.unseen)
    exact_kl: bool = True


class Backend(abc.ABC):
    """The one interface the views and analyses use to run the model (see the module docstring). Besides
    `info`, a backend carries what was loaded: `profile` (utils.core.profiles.ModelProfile), `report` (the load
    report the header shows), `config` (the base's model config, for the size math) and `adapter_dir` (the
    adapter's local files, for the size cross-checks)."""

    info: BackendInfo
    profile: object
    report: object
    config: object = None
    adapter_dir: object = None

    @abc.abstractmethod
    def encode(self, prompt: str, max_new_tokens: int) -> tuple[list[int], list[str]]:
        """Token ids of the prompt, cut from the left to fit the context, and notices of what was cut."""

    @abc.abstractmethod
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids; special tokens written out as the tokenizer spells them, unless skipped."""

    @abc.abstractmethod
    def stream_rows(
        self,
        prompt: str,
        rows: list[Row],
        settings: GenerationSettings | None = None,
        stop_event: threading.Event | None = None,
    ) -> Iterator[StreamUpdate]:
        """Every row's state after each generated token; the last update has finished=True. Closing the
        iterator early stops generation and frees the model."""

    @abc.abstractmethod
    def score_rows(
        self,
        sequences: list[list[int]],
        strengths: list,
        keep_from: int | Sequence[int] = 0,
        top_k: int = 0,
        kl_pairs: Sequence[tuple[int, int]] = (),
    ) -> Scores:
        """Teacher-forced scores of each token after position `keep_from` of each row (one position for all,
        or one per row), at its strength."""

    @abc.abstractmethod
    def next_tokens(self, prompt: str, rows: list[Row], top_k: int = 10) -> dict[str, NextTokenView]:
        """The top_k next tokens after the prompt for each row, from one batch."""

    @abc.abstractmethod
    def evaluate_chunk(
        self, prompts: list[str], strengths: list[float], max_new_tokens: int, top_k: int
    ) -> list[list[ChunkAnswer]]:
        """Greedy answers of every prompt at every strength, in one batch: result[strength][prompt]."""

    def release_kept_run(self) -> None:  # noqa: B027 - nothing to free unless the backend keeps runs
        """Free what a run with keep_for_scoring kept, once its scoring is done."""

    # What prompt formats need (utils/core/prompt_format.py); a backend without a tokenizer at hand says so.

    def chat_templates(self) -> dict[str, str]:
        """The chat templates the loaded files ship: {"base": the base tokenizer's, adapter name: an adapter
        folder's own (tokenizer_config.json or chat_template.jinja)}, each only where it exists."""
        return {}

    def special_tokens(self) -> dict[str, str]:
        """The tokenizer's special tokens by role, for templates: {"bos_token", "eos_token", ...}."""
        return {}

    def encode_parts(self, parts: Sequence[tuple[str, bool]]) -> list[int]:
        """Token ids of a rendered prompt given as (text, typed_by_visitor) parts, no BOS added: a template's
        own text with its special tokens read as such, a visitor's text with special-token spellings kept as
        plain text (as `encode` keeps them)."""
        raise InputError(f"The {self.info.name} backend cannot render chat templates.")

    def embedding_norms(self, token_ids: Sequence[int]) -> tuple[list[float], float, float]:
        """(the input-embedding norm of each token, the median norm over the vocabulary, 1.4826 x the median
        absolute deviation of the norms), to tell tokens that look untrained."""
        raise InputError(f"The {self.info.name} backend does not expose the model's embeddings.")

    def merged_runs(
        self, adapter: str, routes: list[str], sequences: list[list[int]], keep_from: list[int],
        prompts: list[str], max_new_tokens: int,
    ) -> dict[str, MergedRuns]:  # fmt: skip
        """Per route, a copy of the model with the named adapter merged that way, run on `sequences`
        teacher-forced (scored after each keep_from, against the unmerged adapter) and greedily on `prompts`;
        each copy freed after. A copy that would not fit in memory is not built: its MergedRuns says why."""
        raise InputError(f"The {self.info.name} backend cannot merge adapters into a copy of its model.")

    def status(self, refresh: bool = False) -> str:
        """Live state for the header (a server's reachability; `refresh` asks again); "" if none can change."""
        return ""

    # Only where info.inspectable: the model itself, for views of its structure and weights.

    def loaded_model(self):
        """The model object, for views of its structure that never run it (printouts, parameter counts)."""
        raise InputError(
            f"This view reads the model's structure, which the {self.info.name} backend does not expose."
        )

    @contextmanager
    def adapter_weights(self, adapter: str = FINE_TUNED) -> Iterator[list[LoraWeights]]:
        """Hold the model and yield the weights of every layer the named adapter adapts (FINE_TUNED: the
        primary), in the order of info.lora_layers."""
        raise InputError(
            f"This view reads the adapter's weights, which the {self.info.name} backend does not expose."
        )
        yield  # pragma: no cover

    # Built on the methods above, the same for every backend.

    @property
    def has_adapter(self) -> bool:
        return self.info.has_adapter

    @property
    def adapter_names(self) -> list[str]:
        """The loaded adapters' names, the primary (FINE_TUNED's) first."""
        return [adapter["name"] for adapter in self.info.adapters]

    def adapter_named(self, name: str) -> dict:
        """The loaded adapter of this name (FINE_TUNED: the primary), or an InputError listing the names."""
        for adapter in self.info.adapters:
            if adapter["name"] == name or (name == FINE_TUNED and adapter["primary"]):
                return adapter
        loaded = ", ".join(self.adapter_names) or "none: the base runs alone"
        raise InputError(f"No adapter is called {str(name)[:60]!r}. Loaded adapters: {loaded}.")

    def run_rows(
        self, prompt: str, rows: list[Row], settings: GenerationSettings | None = None
    ) -> StreamUpdate:
        """The final state of a whole generation of these rows (no streaming)."""
        updates = self.stream_rows(prompt, rows, settings)
        last = next(updates)
        for last in updates:  # noqa: B007 - only the final state is wanted
            pass
        return last

    def rows_for(self, mode: str, strength=1.0) -> list[Row]:
        """The rows of a Compare run: the base at s = 0, the fine-tune at `strength` (1 = as trained)."""
        return compare_rows(self.has_adapter, mode, strength)

    def sweep_rows(self, strengths: list[float]) -> list[Row]:
        """One row per strength, keyed by position (a strength may repeat), labelled "s = ..."."""
        if not self.has_adapter and any(s != 0 for s in strengths):
            raise InputError("No adapter is loaded (base-only), so only strength 0 exists.")
        return [Row(f"s{i}", strength_label(s), float(s)) for i, s in enumerate(strengths)]

    def stream(
        self, prompt, mode="both", settings=None, stop_event=None, strength=1.0
    ) -> Iterator[StreamUpdate]:
        """The Compare panes (base at s = 0, fine-tune at `strength`) streamed from one batch."""
        return self.stream_rows(prompt, self.rows_for(mode, strength), settings, stop_event)

    def run(self, prompt, mode="both", settings=None, strength=1.0) -> StreamUpdate:
        """The final state of a whole Compare generation (no streaming)."""
        return self.run_rows(prompt, self.rows_for(mode, strength), settings)

    def next_token_views(self, prompt, mode="both", top=10, strength=1.0) -> dict[str, NextTokenView]:
        """The Compare panes' next tokens after the prompt."""
        return self.next_tokens(prompt, self.rows_for(mode, strength), top)


def compare_rows(has_adapter: bool, mode: str, strength=1.0) -> list[Row]:
    """The Compare rows for a mode ("base", "fine_tuned", "both"), the fine-tune at `strength`."""
    strength = check_strength(strength)
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
    if FINE_TUNED in MODES[mode] and not has_adapter:
        raise InputError("No adapter is loaded, so there is no fine-tuned pane: choose 'base'.")
    rows = []
    for key in MODES[mode]:
        if key == BASE:
            rows.append(Row(BASE, PANE_LABELS[BASE], 0.0))
        else:
            label = PANE_LABELS[FINE_TUNED] if strength == 1 else f"Fine-tuned ({strength_label(strength)})"
            rows.append(Row(FINE_TUNED, label, strength))
    return rows


def placement(backend: Backend, items) -> tuple[list, list]:
    """(strengths, adapter positions in `backend.info.adapters`) of rows given as Row, Use, or a bare strength
    of the primary adapter. A row at strength 0 is the base whatever it names (position None).

    Example: with adapters (final, step-100): placement(b, [Use(None), Use("step-100", 0.5), 1.0])
    -> ([0.0, 0.5, 1.0], [None, 1, 0])
    """
    positions = {adapter["name"]: i for i, adapter in enumerate(backend.info.adapters)}
    strengths, adapters = [], []
    for item in items:
        name, strength = (item.adapter, item.strength) if isinstance(item, (Row, Use)) else (FINE_TUNED, item)
        if name is None or (isinstance(strength, (int, float)) and float(strength) == 0.0):
            strengths.append(0.0)
            adapters.append(None)
            continue
        if name == FINE_TUNED and backend.info.adapters:
            adapters.append(0)
        else:
            if name not in positions:
                backend.adapter_named(name)  # raises, naming the loaded adapters
            adapters.append(positions[name])
        strengths.append(strength)
    return strengths, adapters


def strength_label(strength: float) -> str:
    """The label of a strength. Example: strength_label(0.5) -> "s = 0.5"; strength_label(1.0) -> "s = 1"."""
    return f"s = {strength:g}"


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two outputs differ, or None when they are equal.

    Example: first_divergence([1, 2, 3], [1, 5]) -> 1; first_divergence([1, 2], [1, 2]) -> None
    """
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
