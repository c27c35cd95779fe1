"""ZeroGPU's side of every model call: spaces.GPU with a duration from the work (utils/core/gpu_budget.py), and
every failure inside turned into a message a visitor can read.

On a ZeroGPU Space each wrapped call runs in a GPU worker forked from the server, for a reserved time that the
visitor's quota must cover; elsewhere spaces.GPU returns the function unchanged and no duration is computed.
Only gr.Error keeps its message across the worker, so every other exception becomes one inside the call.
"""

import functools
import inspect

import spaces

from ui.common import log, user_message


def on_gpu(duration, what: str):
    """spaces.GPU(duration=...) for a function or a generator function. `duration` is a number or a function of
    the call's arguments; `what` names the call in messages ("the comparison"). Every failure inside becomes a
    gr.Error there: utils' messages as written, an out-of-memory with what to reduce, anything else by its
    class with the details in the log."""

    def wrap(fn):
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def stream(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as exc:
                    raise gpu_failure(exc, what) from None

            return spaces.GPU(duration=duration)(stream)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                raise gpu_failure(exc, what) from None

        return spaces.GPU(duration=duration)(call)

    return wrap


def gpu_failure(exc: Exception, where: str):
    """The gr.Error a visitor reads for a failure inside a GPU call (gr.Error itself passes unchanged)."""
    import gradio as gr

    if isinstance(exc, gr.Error):
        return exc
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        log.warning("%s ran out of memory: %s", where, exc)
        return gr.Error(
            "The GPU ran out of memory: try fewer new tokens, a shorter prompt, or fewer strengths or examples "
            "at once. The model is free again.",
            print_exception=False,
        )
    return user_message(exc, where)
