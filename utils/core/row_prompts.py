"""Which prompt each row of a batch runs on: the shared prompt encoded, or the row's own token ids (its pane's
prompt format, utils/core/prompt_format.py). The analyses that read texts after the prompt (the token lens,
the pane lens, log p under each row) take the result of `pane_prompts` and ask `prompt_of` for each model's."""

from __future__ import annotations

from collections.abc import Sequence

from utils.core.seam import Backend, Row


def prompt_length(backend: Backend, prompt: str, rows: Sequence[Row], max_new_tokens: int) -> int:
    """The longest prompt of the rows, in tokens: a row's own prompt_ids, else `prompt` encoded."""
    shared = None
    lengths = []
    for row in rows:
        if row.prompt_ids is not None:
            lengths.append(len(row.prompt_ids))
        else:
            shared = shared if shared is not None else len(backend.encode(prompt, max_new_tokens)[0])
            lengths.append(shared)
    return max(lengths, default=0)


def pane_prompts(backend: Backend, prompt: str, rows: Sequence[Row], max_new_tokens: int):
    """The prompt ids the rows ran on: the shared prompt's (a list) where no row has its own, else each row's
    keyed by row (the shared prompt's for a row without its own)."""
    if all(row.prompt_ids is None for row in rows):
        return backend.encode(prompt, max_new_tokens)[0]
    shared = None
    out = {}
    for row in rows:
        if row.prompt_ids is not None:
            out[row.key] = list(row.prompt_ids)
        else:
            shared = shared if shared is not None else backend.encode(prompt, max_new_tokens)[0]
            out[row.key] = shared
    return out


def prompt_of(prompt_ids: list[int] | dict[str, list[int]], key: str) -> list[int]:
    """A pane's prompt ids from the shared prompt's, or from each pane's own (keyed by pane; a key not there,
    such as a reference row, takes the first pane's).

    Example: prompt_of([1, 2], "base") -> [1, 2]; prompt_of({"a": [1], "b": [2, 3]}, "x") -> [1]
    """
    if not isinstance(prompt_ids, dict):
        return list(prompt_ids)
    return list(prompt_ids.get(key, next(iter(prompt_ids.values()))))
