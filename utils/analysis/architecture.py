"""Architecture printouts: the base as loaded, the PEFT-wrapped model, and a diff marking what LoRA added.

All text comes from live objects (str(model)). The app holds one PeftModel, so the base view is derived
from it by replacing each `lora.X(...)` wrapper with its `base_layer` line: exact, and no unloading.
The reference Llama-3.1-8B pair is built on the meta device from configs/ and cached.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache

from utils.analysis.sizing import DEFAULT_LORA
from utils.core.profiles import REFERENCE_CONFIG_DIR, LoraSettings

ADDED, SAME, REMOVED = "added", "same", "removed"

_INDENT = re.compile(r"^( *)")
_ITEM = re.compile(r"^( *)\((\d+)(?:-(\d+))?\): (?:\d+ x )?(.*)$")
_WRAPPER = re.compile(r"^( *)\(([^)]+)\): lora\.(\w+)\($")
_BASE_LAYER = re.compile(r"^( *)\(base_layer\): (.*)$")
_PEFT_TOP = re.compile(r"^Peft\w*\($")
_PEFT_TUNER = re.compile(r"^ {2}\(base_model\): \w+\($")
_PEFT_MODEL = re.compile(r"^ {4}\(model\): (.*)$")
_SHAPE = re.compile(r"in_features=(\d+), out_features=(\d+)")
_LORA_DICT = re.compile(r"^( *)\((lora_A|lora_B|lora_dropout)\): ModuleDict\($")


def _indent(line: str) -> int:
    return len(_INDENT.match(line).group(1))


def _block_end(lines: list[str], i: int) -> int:
    """Index just past the block that starts at lines[i]: its deeper lines and its closing ')'."""
    base = _indent(lines[i])
    k = i + 1
    while k < len(lines) and _indent(lines[k]) > base:
        k += 1
    if k < len(lines) and k > i + 1 and lines[k].strip().startswith(")"):
        k += 1
    return k


def architecture_printout(model) -> str:
    """str(model): torch's own printout of the live object, repeated layers already folded by ModuleList."""
    return str(model)


# ---------------------------------------------------------------------------------------------------
# Folding


def fold_repeated_layers(text: str) -> str:
    """Fold runs of identical numbered siblings into one copy, as torch's ModuleList printout does.

    Works on unfolded text and on text torch already folded (it also merges neighbouring groups, as
    left behind when an adapter wrapped only some layers), so folding twice changes nothing.
    Example: "(0): Block(\\n  (f): Linear()\\n)\\n(1): Block(\\n  (f): Linear()\\n)"
        -> "(0-1): 2 x Block(\\n  (f): Linear()\\n)"
    """
    return "\n".join(_fold(text.split("\n")))


def _fold(lines: list[str]) -> list[str]:
    out: list[str] = []
    pending = None  # (indent, first, last, rest, body)

    def flush():
        if pending is not None:
            indent, first, last, rest, body = pending
            n = last - first + 1
            head = f"({first}): {rest}" if n == 1 else f"({first}-{last}): {n} x {rest}"
            out.append(" " * indent + head)
            out.extend(body)

    i = 0
    while i < len(lines):
        m = _ITEM.match(lines[i])
        if not m:
            flush()
            pending = None
            out.append(lines[i])
            i += 1
            continue
        end = _block_end(lines, i)
        indent, first = len(m.group(1)), int(m.group(2))
        last = int(m.group(3)) if m.group(3) else first
        item = (indent, first, last, m.group(4), tuple(_fold(lines[i + 1 : end])))
        if (
            pending is not None
            and pending[0] == indent
            and pending[2] + 1 == first
            and pending[3:] == item[3:]
        ):
            pending = (indent, pending[1], last, item[3], item[4])
        else:
            flush()
            pending = item
        i = end
    flush()
    return out


# ---------------------------------------------------------------------------------------------------
# Base view from the PEFT view


def _base_equivalents(peft_text: str) -> list[tuple[str, str | None]]:
    """Each line of a PEFT printout with the line the plain base printout has in its place (None: added).

    The PeftModel / LoraModel wrappers at the top are added and everything inside moves 4 spaces left;
    in a `(name): lora.X(` block, the `(base_layer): ...` line becomes `(name): ...` and the rest is added.
    """
    lines = peft_text.split("\n")
    out: list[tuple[str, str | None]] = []
    shift = 0
    start, stop = 0, len(lines)
    if (
        len(lines) >= 6
        and _PEFT_TOP.match(lines[0])
        and _PEFT_TUNER.match(lines[1])
        and _PEFT_MODEL.match(lines[2])
        and [s.strip() for s in lines[-2:]] == [")", ")"]
    ):
        shift = 4
        out += [(lines[0], None), (lines[1], None), (lines[2], _PEFT_MODEL.match(lines[2]).group(1))]
        start, stop = 3, len(lines) - 2
    i = start
    while i < stop:
        line = lines[i]
        w = _WRAPPER.match(line)
        if not w:
            out.append((line, line[shift:]))
            i += 1
            continue
        end = _block_end(lines, i)
        indent, name = w.group(1), w.group(2)
        out.append((line, None))
        k = i + 1
        while k < end:
            b = _BASE_LAYER.match(lines[k])
            if b and len(b.group(1)) == len(indent) + 2:
                stop_k = _block_end(lines, k)
                out.append((lines[k], (indent + f"({name}): " + b.group(2))[shift:]))
                out += [(lines[j], lines[j][shift + 2 :]) for j in range(k + 1, stop_k)]
                k = stop_k
            else:
                out.append((lines[k], None))
                k += 1
        i = end
    out += [(line, None) for line in lines[stop:]]
    return out


def strip_adapter(peft_text: str) -> str:
    """The plain base printout recovered from a PEFT printout (or from str(peft_model.get_base_model())).

    Verified equal to str() of the same base loaded without an adapter (tests/test_architecture.py).
    """
    kept = [base for _, base in _base_equivalents(peft_text) if base is not None]
    return fold_repeated_layers("\n".join(kept))


def base_printout(model) -> str:
    """The base's printout from a live model that may carry an adapter, without unloading it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return strip_adapter(architecture_printout(inner))


# ---------------------------------------------------------------------------------------------------
# Diff


@dataclass(frozen=True)
class DiffLine:
    """One line of the annotated diff."""

    text: str  # the printout line (the PEFT side; the base side for removed lines)
    kind: str  # "same", "added" (the adapter put it there) or "removed" (only in the base)
    note: str = ""  # e.g. "A: 4096 x 32 = 131,072 params", shown as a trailing comment

    @property
    def is_added(self) -> bool:
        return self.kind == ADDED

    @property
    def rendered(self) -> str:
        return f"{self.text}   # {self.note}" if self.note else self.text


def _compact_lora_dicts(pairs: list[tuple[str, str | None]]) -> list[tuple[str, str | None, str]]:
    """Put one-entry lora_A / lora_B / lora_dropout ModuleDicts on one line and annotate the matrices."""
    out: list[tuple[str, str | None, str]] = []
    i = 0
    while i < len(pairs):
        line, base = pairs[i]
        m = _LORA_DICT.match(line)
        if m and base is None and i + 2 < len(pairs) and pairs[i + 2][0] == m.group(1) + ")":
            child = pairs[i + 1][0].strip()
            note = ""
            shape = _SHAPE.search(child)
            if shape and m.group(2) != "lora_dropout":
                a, b = int(shape.group(1)), int(shape.group(2))
                letter = m.group(2)[-1]
                note = f"{letter}: {a} x {b} = {a * b:,} params"
            out.append((f"{m.group(1)}({m.group(2)}): ModuleDict({child})", None, note))
            i += 3
            continue
        out.append((line, base, ""))
        i += 1
    # the wrapper line gets the whole layer's cost: r x (in + out)
    for j, (line, base, _) in enumerate(out):
        if _WRAPPER.match(line) and j + 1 < len(out):
            shape = _SHAPE.search(out[j + 1][0])
            rank = next(
                (int(_SHAPE.search(t).group(2)) for t, _, n in out[j + 1 : j + 8] if n.startswith("A:")), None
            )
            if shape and rank:
                a, b = int(shape.group(1)), int(shape.group(2))
                out[j] = (line, base, f"r x (in + out) = {rank} x ({a} + {b}) = {rank * (a + b):,} params")
    return out


def annotated_diff(base_text: str, peft_text: str) -> list[DiffLine]:
    """The PEFT printout line by line, each marked same / added against the base printout.

    Lines are matched on what the base would have in their place (a wrapper's base_layer line counts as
    the base's own layer, the PeftModel header lines as added), so the indentation PEFT adds does not
    turn every line into a change. lora_A / lora_B are folded onto one line with their shape and params.
    Base lines with no counterpart come out as "removed" (e.g. when the texts are of different models).
    """
    pairs = _compact_lora_dicts(_base_equivalents(peft_text))
    keys = [base if base is not None else ("\0added", j) for j, (_, base, _) in enumerate(pairs)]
    base_lines = base_text.split("\n")
    matcher = difflib.SequenceMatcher(None, base_lines, keys, autojunk=False)
    out: list[DiffLine] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag in ("delete", "replace"):
            out += [DiffLine(line, REMOVED) for line in base_lines[i1:i2]]
        kind = SAME if tag == "equal" else ADDED
        out += [DiffLine(line, kind, note) for line, _, note in pairs[j1:j2]]
    return out


def diff_text(diff: list[DiffLine]) -> str:
    """The diff as plain text: "+ " before added lines, "- " before removed ones, two spaces otherwise."""
    mark = {ADDED: "+ ", REMOVED: "- ", SAME: "  "}
    return "\n".join(mark[d.kind] + d.rendered for d in diff)


@dataclass(frozen=True)
class ArchitectureViews:
    """The three texts the UI shows side by side."""

    base_text: str  # the base as loaded (Linear4bit layers), folded
    peft_text: str  # str(peft_model): lora.Linear4bit wrappers with base_layer, lora_dropout, lora_A, lora_B
    diff: tuple[DiffLine, ...]  # the PEFT printout with the adapter's lines marked and A / B annotated

    @property
    def diff_text(self) -> str:
        return diff_text(list(self.diff))

    @property
    def added_lines(self) -> int:
        return sum(d.is_added for d in self.diff)


def architecture_views(base_model, peft_model) -> ArchitectureViews:
    """Base, PEFT and diff views. `base_model` may be None: the base view is then derived from peft_model."""
    peft_text = architecture_printout(peft_model)
    base_text = architecture_printout(base_model) if base_model is not None else base_printout(peft_model)
    return ArchitectureViews(base_text, peft_text, tuple(annotated_diff(base_text, peft_text)))


# ---------------------------------------------------------------------------------------------------
# The reference model on the meta device


def peft_lora_config(lora: LoraSettings):
    """peft's LoraConfig for these settings ("all-linear" passed through as peft's shorthand)."""
    from peft import LoraConfig

    targets = list(lora.target_modules) if not isinstance(lora.target_modules, str) else [lora.target_modules]
    if len(targets) == 1 and targets[0].lower() == "all-linear":
        targets = "all-linear"
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def meta_nf4_model(config):
    """The model of `config` on the meta device with its linear layers swapped for bitsandbytes Linear4bit,
    exactly as transformers' quantizer does before loading weights (same skip list: lm_head, tied weights)."""
    import torch
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import get_keys_to_not_convert

    from utils.analysis.sizing import build_meta_model

    model = build_meta_model(config)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    skip = list(
        set(get_keys_to_not_convert(model)) | set(getattr(model, "_keep_in_fp32_modules", None) or ())
    )
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=quant)
    model.is_loaded_in_4bit = True  # what peft checks to wrap Linear4bit in lora.Linear4bit
    return model


def meta_peft_model(config, lora: LoraSettings):
    """meta_nf4_model wrapped by peft.get_peft_model; the adapter weights are created on meta too."""
    from peft import get_peft_model

    from utils.analysis.sizing import adapter_size

    adapter_size(config, lora)  # a clear InputError (bad r, unknown module) before peft's own
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(meta_nf4_model(config), peft_lora_config(lora), low_cpu_mem_usage=True)


def reference_models(lora: LoraSettings = DEFAULT_LORA):
    """(base, peft) Llama-3.1-8B on the meta device from configs/llama-3.1-8b, NF4 layers in place.

    No weights, no memory; built once per LoRA setting (a second or two) and cached, so treat the two
    models as read-only. The base is a separate build: get_peft_model changes the model it wraps.
    """
    return _reference_models(_hashable(lora))


@lru_cache(maxsize=8)
def _reference_models(lora: LoraSettings):
    from utils.analysis.sizing import load_config

    config = load_config(REFERENCE_CONFIG_DIR)
    return meta_nf4_model(config), meta_peft_model(config, lora)


def reference_views(lora: LoraSettings = DEFAULT_LORA) -> ArchitectureViews:
    """architecture_views() of the reference pair, cached per LoRA setting."""
    return _reference_views(_hashable(lora))


def _hashable(lora: LoraSettings) -> LoraSettings:
    """The cache key: target modules as a tuple even where a caller passed a list or a string."""
    targets = lora.target_modules
    targets = tuple(targets.split(",")) if isinstance(targets, str) else tuple(targets)
    return replace(lora, target_modules=targets)


@lru_cache(maxsize=8)
def _reference_views(lora: LoraSettings) -> ArchitectureViews:
    base, peft = _reference_models(lora)
    return architecture_views(base, peft)
