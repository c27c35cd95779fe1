"""The prompt format controls of Compare, the Strength sweep and their token lens (raw text, the base's chat
template, the adapter's own, a custom Jinja template; one shared, or one per pane), the view of what each
pane's model was given, and /render_prompt. The rendering itself is utils/core/prompt_format.py; it runs in
the server process before any GPU call, so a template error never costs a visitor's quota."""

import html

import gradio as gr

from ui.common import user_errors, warn_all
from ui.lens import Lens
from utils.core.inputs import clean_prompt, parse_number
from utils.core.panes import pane_formats, pane_rows, parse_panes
from utils.core.prompt_format import (
    FORMATS,
    PromptFormat,
    default_format,
    format_rows,
    parse_format,
    template_differs_warning,
)
from utils.core.seam import BASE, FINE_TUNED, Row

SAME = "same"  # the base pane's format choice that follows the shared one
GIVEN_CSS = """
.lens-given pre { white-space: pre-wrap; word-break: break-word; margin: 4px 0 10px; padding: 6px 8px;
  background: var(--block-background-fill); border: 1px solid var(--border-color-primary); border-radius: 4px; }
.lens-given .special { color: var(--color-accent); font-weight: 600; }
.lens-given .warn { color: #b45309; }
"""


class PromptFormats:
    """The formats the tabs offer on one Lens, and /render_prompt."""

    def __init__(self, lens: Lens):
        self.lens = lens
        self.default = default_format(lens.backend)
        self.templates = lens.backend.chat_templates()

    def choices(self) -> list[tuple[str, str]]:
        """The formats this model has: chat where the base ships a template, adapter where an adapter does."""
        names = self.lens.backend.adapter_names
        available = ["raw", "custom"]
        if "base" in self.templates:
            available.insert(1, "chat")
        if any(name in self.templates for name in names):
            available.insert(-1, "adapter")
        return [(FORMATS[kind], kind) for kind in available]

    def from_controls(self, kind, system, template) -> PromptFormat:
        """The shared format the UI's controls describe."""
        return parse_format({"kind": kind or "raw", "system": system or "", "template": template or ""})

    def apply(self, prompt, rows: list[Row], formats: dict, max_new_tokens: int):
        """(rows with their formatted prompts, each row's RenderedPrompt), the prompt checked first; the
        notices and warnings shown (UI) or logged (API) by the caller."""
        text, _ = clean_prompt(prompt)
        return format_rows(self.lens.backend, text, rows, formats, max_new_tokens)

    def warnings(self, rendered: dict) -> list[str]:
        """Every rendered prompt's warnings, and the adapter-template one where it applies (each once)."""
        found = [w for r in rendered.values() for w in r.warnings]
        if any(r.template_from for r in rendered.values()):
            differs = template_differs_warning(self.lens.backend)
            found += [differs] if differs else []
        return list(dict.fromkeys(found))

    def compare_formats(self, prompt_format, base_format) -> dict:
        """The Compare panes' formats: the fine-tuned pane's, and the base's (its own, or the same)."""
        shared = parse_format(prompt_format, default=self.default)
        base = shared if base_format in (None, "", SAME) else parse_format(base_format, "base_format")
        return {BASE: base, FINE_TUNED: shared}

    @user_errors
    def render_prompt(
        self,
        prompt: str,
        prompt_format: str | dict | None = None,
        base_format: str | dict | None = None,
        panes: list | None = None,
        max_new_tokens: int = 64,
    ) -> dict:
        """What each pane's model is given for a prompt, in the formats asked (nothing is generated).

        Args:
            prompt: the visitor's text (the user turn in a chat format)
            prompt_format: "raw" (the text as typed), "chat" (the base tokenizer's chat template), "adapter"
                (the adapter folder's own template), or {"kind": ..., "system": optional system message,
                "template": a Jinja template for kind "custom"}; null for the profile's default (raw for
                pricer profiles, else chat where the base has a template)
            base_format: the base pane's own format, as prompt_format; null for the same as prompt_format
            panes: null for base and fine-tuned; else panes as /compare takes them, each with an optional
                "format" of its own
            max_new_tokens: the room left for the answer (a longer prompt is cut from the left)
        Returns:
            rendered: {"panes": [{"label", "format", "template_from", "text", "token_count", "tokens",
            "warnings"}], "warnings": [...]}. text spells out the special tokens; tokens are the token ids
            decoded one by one.
        """
        n = parse_number("max_new_tokens", max_new_tokens, integer=True)
        rows, formats = self.rows_and_formats(prompt_format, base_format, panes)
        _, rendered = self.apply(prompt, rows, formats, max(1, min(n, 512)))
        decode = self.lens.backend.decode
        return {
            "panes": [{"label": row.label, **rendered[row.key].as_dict(decode)} for row in rows],
            "warnings": self.warnings(rendered),
        }

    def rows_and_formats(self, prompt_format, base_format, panes) -> tuple[list[Row], dict]:
        """The API's panes (or base and fine-tuned) and each one's format."""
        if panes is not None:
            parsed = parse_panes(panes, self.lens.backend)
            rows = pane_rows(parsed)
            return rows, pane_formats(parsed, rows, parse_format(prompt_format, default=self.default))
        rows = self.lens.backend.rows_for(self.lens.both_or_base())
        return rows, self.compare_formats(prompt_format, base_format)


def controls(formats: PromptFormats, with_base: bool):
    """The format controls: (shared kind, base pane's kind or None, system message, custom template)."""
    choices = formats.choices()
    kind = gr.Dropdown(
        choices,
        value=formats.default.kind if formats.default.kind in {kind for _, kind in choices} else "raw",
        label="Prompt format",
        info="What the model is given: the text as typed, or the prompt as a user turn in a chat template.",
        elem_id="lens-format" if with_base else None,
    )
    base_kind = None
    if with_base:
        base_kind = gr.Dropdown(
            [("Same as the fine-tuned pane", SAME), *choices],
            value=SAME,
            label="Base pane's format",
            info="A base model may need another format than its fine-tune (raw text for a model never "
            "trained on a chat template).",
            elem_id="lens-base-format",
        )
    with gr.Accordion("System message and custom template", open=False):
        system = gr.Textbox(label="System message (chat formats; optional)", lines=2, max_lines=6)
        template = gr.Code(
            label="Custom Jinja template (messages in; rendered in a sandbox that reads only the messages)",
            language="jinja2",
            lines=6,
            value="{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        )
    return kind, base_kind, system, template


def given_html(rendered: dict, rows: list[Row], decode, warnings: list[str]) -> str:
    """Each pane's prompt as its model got it: format, token count, and the text with special tokens marked."""
    parts = []
    for row in rows:
        r = rendered[row.key]
        source = f", template from {html.escape(r.template_from)}" if r.template_from else ""
        parts.append(
            f"<div><b>{html.escape(row.label)}</b>: {html.escape(r.format)}{source}, "
            f"{len(r.ids):,} tokens<pre>{_marked(r.ids, decode)}</pre></div>"
        )
    parts += [f"<div class='warn'>⚠ {html.escape(w)}</div>" for w in warnings]
    return "<div class='lens-given'>" + "".join(parts) + "</div>"


def _marked(ids, decode) -> str:
    """The prompt's text, special tokens (those skip_special_tokens drops) in their own colour."""
    out = []
    for t in ids:
        text = decode([t])
        special = decode([t], skip_special_tokens=True) == "" and text != ""
        out.append(f"<span class='special'>{html.escape(text)}</span>" if special else html.escape(text))
    return "".join(out)


def formatted(
    formats: PromptFormats, prompt, rows, shared_controls, base_kind, max_new_tokens, per_pane=None
):
    """The UI's rows formatted: (rows, rendered, warnings), the warnings shown. per_pane: each row's format
    where the panes give their own (the sweep's typed panes)."""
    kind, system, template = shared_controls
    shared = formats.from_controls(kind, system, template)
    if per_pane is not None:
        chosen = per_pane
    else:
        base = shared if base_kind in (None, "", SAME) else formats.from_controls(base_kind, system, template)
        chosen = {row.key: base if row.key == BASE else shared for row in rows}
    rows, rendered = formats.apply(prompt, rows, chosen, max_new_tokens)
    warnings = formats.warnings(rendered)
    warn_all(warnings)
    return rows, rendered, warnings
