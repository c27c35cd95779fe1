"""The Compare panes: the stats line under a pane, where the two outputs first differ, and the Stop flag."""

from __future__ import annotations

import threading
from collections.abc import Callable

from ui.views.style import escape as _e
from utils.core.seam import BASE, FINE_TUNED, PANE_LABELS, PaneState, first_divergence

DIVERGENCE_CSS = """
.lens-div { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 12px; }
.lens-div .title { font-weight: 600; margin-bottom: 4px; }
.lens-div pre { white-space: pre-wrap; overflow-wrap: anywhere; margin: 4px 0; font-size: 0.9em;
  background: var(--background-fill-secondary); padding: 6px 8px; border-radius: 6px; }
.lens-div .base { border-left: 4px solid #8c8c8c; }
.lens-div .tuned { border-left: 4px solid #4f46e5; }
.lens-div .muted { color: var(--body-text-color-subdued); }
"""


def pane_stats(pane: PaneState | None) -> str:
    """The line under a pane: tokens, tokens/s, time to first token (and why it stopped, once done)."""
    if pane is None:
        return ""
    return pane.stats_line()


def divergence_html(base: PaneState | None, tuned: PaneState | None, decode: Callable, finished: bool) -> str:
    """Where the two outputs first differ: the token index, the shared text, and the two continuations.

    `decode` turns token ids into text (tokenizer.decode). While streaming, equal outputs so far read as
    "no difference yet"; once finished, as identical.
    Example: base [1, 2, 3], fine-tuned [1, 5] -> "first differ at token 1", shared text decode([1]).
    """
    if base is None or tuned is None:
        return ""
    a, b = base.token_ids, tuned.token_ids
    index = first_divergence(a, b)
    unequal_ends = index is not None and (index < min(len(a), len(b)) or finished)
    if index is None or not unequal_ends:
        n = min(len(a), len(b))
        if finished:
            text = (
                f"The two outputs are identical ({n} tokens): the adapter did not change this greedy answer."
            )
        else:
            text = f"No difference yet ({n} tokens so far)."
        return f'<div class="lens-div"><div class="muted">{_e(text)}</div></div>'
    shared = decode(a[:index]) if index else ""
    rest_a, rest_b = decode(a[index:]), decode(b[index:])
    shared_html = (
        f"<pre>{_e(shared)}</pre>"
        if shared
        else '<div class="muted">(nothing: they differ from the first token)</div>'
    )
    return (
        '<div class="lens-div">'
        f'<div class="title">The outputs first differ at token {index} (counting from 0).</div>'
        f'<div class="muted">Shared text up to there:</div>{shared_html}'
        f'<div class="muted">{_e(PANE_LABELS[BASE])} continues:</div>'
        f'<pre class="base">{_e(rest_a) or "(ends here)"}</pre>'
        f'<div class="muted">{_e(PANE_LABELS[FINE_TUNED])} continues:</div>'
        f'<pre class="tuned">{_e(rest_b) or "(ends here)"}</pre>'
        "</div>"
    )


class StopSignal:
    """The Stop button's flag for one browser session, kept in a gr.State.

    gr.State deep-copies its initial value for every new session, so the copy gets its own event; each run
    takes a fresh event with `start()`, so a Stop meant for an old run can never stop the next one.
    """

    def __init__(self):
        self.event = threading.Event()

    def __deepcopy__(self, memo):
        return StopSignal()

    def start(self) -> threading.Event:
        self.event = threading.Event()
        return self.event

    def stop(self) -> None:
        self.event.set()
