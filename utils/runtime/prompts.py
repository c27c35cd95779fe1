"""The in-process engine's prompts: a prompt encoded, each batch row's prompt ids (its own, or the shared
prompt encoded, cut to fit the context), and what prompt formats (utils/core/prompt_format.py) need: the chat
templates the loaded files ship, the tokenizer's special tokens, a rendered prompt tokenized part by part, and
the input embeddings' norms that tell template tokens which look untrained. A mixin of Engine, which holds
the tokenizer (`self.tokenizer`), the loaded pair (`self.pair`), the model (`self.model`) and
`context_length`."""

from __future__ import annotations

import torch

from utils.core.inputs import clean_prompt


class PromptSupport:
    _norms = None  # the input embeddings' norms with their median and spread, computed once when asked
    _templates = None  # the loaded files' chat templates, read once when asked

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

    def row_prompts(self, prompt, rows, max_new_tokens) -> tuple[list[list[int]], list[str]]:
        """Each row's prompt ids (its own prompt_ids, else the shared prompt encoded), cut from the left to fit
        the context, and notices of what was cut."""
        notices, shared = [], None
        prompts = []
        for row in rows:
            if row.prompt_ids is None:
                if shared is None:
                    text, notices = clean_prompt(prompt)
                    shared, more = self.encode(text, max_new_tokens)
                    notices += more
                prompts.append(shared)
                continue
            ids = list(row.prompt_ids)
            limit = self.context_length - max_new_tokens
            if len(ids) > limit:
                notices.append(
                    f"{row.label}: the formatted prompt has {len(ids):,} tokens; the first {len(ids) - limit:,} "
                    "were dropped to fit the context."
                )
                ids = ids[-limit:]
            prompts.append(ids)
        return prompts, list(dict.fromkeys(notices))

    def chat_templates(self) -> dict[str, str]:
        # read from the loaded files once: every formatted prompt asks, and the files never change while serving
        if self._templates is None:
            self._templates = self._read_chat_templates()
        return dict(self._templates)

    def _read_chat_templates(self) -> dict[str, str]:
        from utils.runtime.adapter_files import adapter_chat_template

        templates = {}
        base = self.tokenizer.chat_template
        if isinstance(base, dict):  # named templates: the default one
            base = base.get("default")
        if isinstance(base, str) and base.strip():
            templates["base"] = base
        for name, folder in self.adapter_folders():
            own = adapter_chat_template(folder)
            if own is not None:
                templates[name] = own
        return templates

    def adapter_folders(self) -> list:
        """(name, local folder) of every loaded adapter, the primary first."""
        return [(adapter.name, adapter.directory) for adapter in self.pair.adapters]

    def special_tokens(self) -> dict[str, str]:
        tokens = {}
        for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = getattr(self.tokenizer, role, None)
            if isinstance(value, str):
                tokens[role] = value
        return tokens

    def encode_parts(self, parts) -> list[int]:
        ids = []
        for text, typed_by_visitor in parts:
            if text:
                ids += self.tokenizer(
                    text, add_special_tokens=False, split_special_tokens=bool(typed_by_visitor)
                )["input_ids"]
        return ids

    def embedding_norms(self, token_ids) -> tuple[list[float], float, float]:
        if self._norms is None:
            with torch.inference_mode():
                weight = self.model.get_input_embeddings().weight
                norms = weight.detach().float().norm(dim=-1).cpu()
            median = norms.median()
            spread = 1.4826 * (norms - median).abs().median()
            self._norms = (norms, float(median), float(spread))
        norms, median, spread = self._norms
        size = norms.shape[0]
        return [float(norms[t]) if 0 <= t < size else 0.0 for t in token_ids], median, spread
