"""Prompt formats: what each pane's model is given for a visitor's prompt, and what a visitor sees of it.

A format is the raw text (as typed), the base tokenizer's chat template, the adapter's own template (where its
folder ships one), or a visitor's custom Jinja template (utils/core/template_sandbox.py renders it in a process
of its own); the chat formats put the prompt in a user turn, after an optional system message, and add the
generation prompt, as apply_chat_template(..., add_generation_prompt=True) does.

A visitor's text never turns into control tokens: the template's own text is tokenized with its special tokens
read as such, the visitor's (the prompt and the system message) with special-token spellings kept as plain
text, as raw prompts are. To know which is which, the template is rendered twice, once with the messages and
once with markers in their place; where the template changes a message before writing it (a `| trim`, say)
the two do not line up, and the whole text is tokenized at once, after checking that the visitor's text
spells no special token.

Template tokens that look untrained: an instruct template on a base whose template tokens were never trained
makes it write nonsense. The input-embedding norm of each token the template itself writes is compared with
the vocabulary's: a token whose norm is below the median minus UNTRAINED_SPREADS robust standard deviations
(1.4826 x the median absolute deviation) is flagged (never-trained rows stay near their small initial
values, or at zero, while trained rows spread around a common size).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from utils.core.errors import InputError
from utils.core.seam import BASE, Backend, Row
from utils.core.template_sandbox import TemplateRefused, render, render_isolated

FORMATS = {
    "raw": "Raw text (as typed)",
    "chat": "Base chat template",
    "adapter": "Adapter's own template",
    "custom": "Custom template",
}
MAX_SYSTEM_CHARS = 4_000
UNTRAINED_SPREADS = 4.0
_MARKS = ("\x00\x01lora-lens-system\x01\x00", "\x00\x01lora-lens-prompt\x01\x00")  # never in cleaned text


@dataclass(frozen=True)
class PromptFormat:
    """How a pane's prompt is given to its model."""

    kind: str = "raw"  # one of FORMATS
    system: str = ""  # an optional system message (chat formats)
    template: str = ""  # the Jinja template (kind "custom")

    @property
    def label(self) -> str:
        return FORMATS[self.kind] + (" + system message" if self.system and self.kind != "raw" else "")


RAW = PromptFormat()


@dataclass(frozen=True)
class RenderedPrompt:
    """What one pane's model was given: the text with its special tokens spelled out, and its token ids."""

    format: str  # the format's label
    text: str
    ids: tuple[int, ...]
    template_from: str  # where the template came from ("" for raw)
    warnings: tuple[str, ...] = field(default=())

    def as_dict(self, decode) -> dict:
        return {
            "format": self.format,
            "template_from": self.template_from,
            "text": self.text,
            "token_count": len(self.ids),
            "tokens": [decode([t]) for t in self.ids],
            "warnings": list(self.warnings),
        }


def parse_format(value, name: str = "prompt_format", default: PromptFormat = RAW) -> PromptFormat:
    """A PromptFormat from what the API or the UI sends: null (the default), "raw" | "chat" | "adapter", or
    {"kind", "system", "template"}. Example: parse_format({"kind": "chat", "system": "Be brief."})"""
    if value is None or value == "":
        return default
    if isinstance(value, PromptFormat):
        return value
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, dict):
        raise InputError(f"{name} must be one of {', '.join(FORMATS)} or an object with a kind.")
    unknown = set(value) - {"kind", "system", "template"}
    if unknown:
        raise InputError(
            f"{name} takes kind, system and template; not {', '.join(sorted(map(str, unknown)))}."
        )
    kind = value.get("kind", "raw")
    if kind not in FORMATS:
        raise InputError(f"{name}'s kind must be one of {', '.join(FORMATS)}; got {str(kind)[:40]!r}.")
    system, template = value.get("system") or "", value.get("template") or ""
    if not isinstance(system, str) or not isinstance(template, str):
        raise InputError(f"{name}'s system message and template must be text.")
    system = "".join(c for c in system if c in "\n\t" or c >= " ")
    if len(system) > MAX_SYSTEM_CHARS:
        raise InputError(f"The system message has {len(system):,} characters; at most {MAX_SYSTEM_CHARS:,}.")
    if kind == "custom" and not template.strip():
        raise InputError("A custom format needs its Jinja template (messages in, the prompt text out).")
    return PromptFormat(kind, system if kind != "raw" else "", template if kind == "custom" else "")


def default_format(backend: Backend) -> PromptFormat:
    """Pricer profiles keep the lesson's raw prompt; any other takes the base's chat template where it has
    one (an instruct base answers a prompt in its template; a raw prompt it only continues)."""
    if backend.profile.is_pricer or "base" not in backend.chat_templates():
        return RAW
    return PromptFormat("chat")


def render_prompt(
    backend: Backend, prompt: str, fmt: PromptFormat, adapter: str | None, max_new_tokens: int
) -> RenderedPrompt:
    """The prompt as the pane running `adapter` (None: the base) is given it in format `fmt` (prompt already
    cleaned: utils/core/inputs.clean_prompt)."""
    if fmt.kind == "raw":
        ids, notices = backend.encode(prompt, max_new_tokens)
        return RenderedPrompt(fmt.label, backend.decode(ids), tuple(ids), "", tuple(notices))
    template, source = _template_for(backend, fmt, adapter)
    special = backend.special_tokens()
    messages = ([{"role": "system", "content": fmt.system}] if fmt.system else []) + [
        {"role": "user", "content": prompt}
    ]
    marked = ([{"role": "system", "content": _MARKS[0]}] if fmt.system else []) + [
        {"role": "user", "content": _MARKS[1]}
    ]
    contexts = [dict(special, messages=m, add_generation_prompt=True) for m in (messages, marked)]
    try:
        text, text_marked = (render_isolated if fmt.kind == "custom" else render)(template, contexts)
    except TemplateRefused as exc:
        raise InputError(f"{fmt.label}: {exc}") from None
    ids = backend.encode_parts(_parts(backend, text, text_marked, fmt.system, prompt))
    notices = []
    limit = backend.info.context_length - max_new_tokens
    if len(ids) > limit:
        notices.append(
            f"The formatted prompt has {len(ids):,} tokens; the first {len(ids) - limit:,} were dropped."
        )
        ids = ids[-limit:]
    warnings = tuple(notices) + tuple(_untrained_warnings(backend, text_marked, fmt))
    return RenderedPrompt(fmt.label, text, tuple(ids), source, warnings)


def _template_for(backend: Backend, fmt: PromptFormat, adapter: str | None) -> tuple[str, str]:
    """(template, where it came from) of a chat format for the pane running `adapter`."""
    if fmt.kind == "custom":
        return fmt.template, "custom"
    templates = backend.chat_templates()
    if fmt.kind == "chat":
        if "base" not in templates:
            raise InputError(
                "The base's tokenizer has no chat template: use the raw format or a custom template."
            )
        return templates["base"], "the base's tokenizer"
    name = backend.adapter_named(adapter or "fine_tuned")["name"] if backend.info.adapters else None
    if name is None or name not in templates:
        raise InputError(
            f"Adapter {name or '(none loaded)'} ships no chat template (chat_template.jinja or tokenizer_config.json "
            "in its folder): use the base's chat template or a custom one."
        )
    return templates[name], f"adapter {name}'s folder"


def _parts(backend: Backend, text: str, text_marked: str, system: str, prompt: str) -> list[tuple[str, bool]]:
    """The rendered text as (text, typed_by_visitor) parts (see the module docstring)."""
    pieces, visitor = [text_marked], {_MARKS[0]: system, _MARKS[1]: prompt}
    for mark in _MARKS:
        pieces = [p for piece in pieces for p in _split_keep(piece, mark)]
    parts = [(visitor[p], True) if p in visitor else (p, False) for p in pieces]
    if "".join(t for t, _ in parts) == text:
        return [part for part in parts if part[0]]
    for typed in (system, prompt):
        if typed and backend.encode_parts([(typed, False)]) != backend.encode_parts([(typed, True)]):
            raise InputError(
                "This template changes the message before writing it, so a special token spelled in your text "
                "could not be kept as plain text: remove it, or use another format."
            )
    return [(text, False)]


def _split_keep(text: str, mark: str) -> list[str]:
    out = []
    for i, piece in enumerate(text.split(mark)):
        if i:
            out.append(mark)
        out.append(piece)
    return out


def _untrained_warnings(backend, text_marked: str, fmt: PromptFormat) -> list[str]:
    """A warning naming the template's own tokens whose embeddings look untrained (module docstring)."""
    pieces = [text_marked]
    for mark in _MARKS:
        pieces = [p for piece in pieces for p in piece.split(mark)]
    ids = sorted(set(backend.encode_parts([(piece, False) for piece in pieces if piece])))
    if not ids:
        return []
    try:
        norms, median, spread = backend.embedding_norms(ids)
    except InputError:
        return []
    floor = median - UNTRAINED_SPREADS * spread
    flagged = [(t, n) for t, n in zip(ids, norms, strict=True) if n < floor]
    if not flagged:
        return []
    names = ", ".join(f"{backend.decode([t])!r} (norm {n:.3g})" for t, n in flagged[:6])
    return [
        f"{fmt.label}: the template's tokens {names} look untrained in this model (input-embedding norm below "
        f"{floor:.3g}, the vocabulary's median {median:.3g} minus {UNTRAINED_SPREADS:g} robust standard "
        "deviations); a model given them may write nonsense."
    ]


def template_differs_warning(backend: Backend) -> str | None:
    """A warning where an adapter ships a chat template that differs from the base's, else None."""
    templates = backend.chat_templates()
    base = templates.get("base")
    differing = [
        name for name, t in templates.items() if name != "base" and t.strip() != (base or "").strip()
    ]
    if not differing:
        return None
    return (
        f"Adapter {', '.join(differing)} ships a chat template that differs from the base's"
        + ("" if base else " (the base has none)")
        + ": it was likely trained on its own format; compare with the adapter's template for a fair view."
    )


def format_rows(
    backend: Backend, prompt: str, rows: list[Row], formats: dict[str, PromptFormat], max_new_tokens: int
) -> tuple[list[Row], dict[str, RenderedPrompt]]:
    """Rows with their prompt_ids set where their format is not raw (a raw row keeps the shared prompt), and
    every row's rendered prompt, keyed by row. `formats` maps row keys to formats (a missing key: raw)."""
    from dataclasses import replace

    rendered, out, done = {}, [], {}
    for row in rows:
        fmt = formats.get(row.key, RAW)
        adapter = None if row.key == BASE or row.adapter is None else row.adapter
        # panes in one format give one prompt (the adapter's own template excepted): render each once, so six
        # panes in a custom template start one sandboxed interpreter, not six
        key = (fmt, adapter if fmt.kind == "adapter" else None)
        if key not in done:
            done[key] = render_prompt(backend, prompt, fmt, adapter, max_new_tokens)
        rendered[row.key] = done[key]
        out.append(row if fmt.kind == "raw" else replace(row, prompt_ids=rendered[row.key].ids))
    return out, rendered
