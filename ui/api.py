"""The named endpoints for gradio_client and the "Use via API" page: plain functions, not the UI's handlers.

The page shows each function's whole docstring (parameters and return shape included). Endpoints that run
the model share the one model slot with the UI's events.
"""

import inspect

import gradio as gr

from ui.common import ON_MODEL


def register(tabs: dict) -> None:
    """Register every tab's endpoints; `tabs` maps tab names to the tab objects built for this app."""

    def endpoint(fn, name, **kwargs):
        gr.api(fn, api_name=name, api_description=inspect.getdoc(fn), **kwargs)

    compare, sweep = tabs["compare"], tabs["sweep"]
    endpoint(compare.compare, "compare", **ON_MODEL)
    endpoint(compare.generate, "generate", **ON_MODEL)
    endpoint(sweep.sweep, "sweep", **ON_MODEL)
    endpoint(compare.estimate_price, "estimate_price", **ON_MODEL)
    endpoint(tabs["token_lens"].token_lens, "token_lens", **ON_MODEL)
    endpoint(compare.formats.render_prompt, "render_prompt", concurrency_limit=4)
    endpoint(tabs["architecture"].architecture, "architecture", concurrency_id="meta", concurrency_limit=1)
    endpoint(tabs["anatomy"].anatomy, "anatomy", **ON_MODEL)
    endpoint(tabs["anatomy"].ablate, "ablate", **ON_MODEL)
    endpoint(tabs["size"].size_math, "size_math", concurrency_limit=2)
    endpoint(tabs["evaluate"].evaluate, "evaluate", **ON_MODEL)
    endpoint(tabs["forgetting"].forgetting, "forgetting", **ON_MODEL)
    endpoint(tabs["adapters"].adapters, "adapters", concurrency_limit=4)
    endpoint(tabs["adapters"].adapter_similarity, "adapter_similarity", **ON_MODEL)
    endpoint(tabs["adapters"].checkpoint_growth, "checkpoint_growth", **ON_MODEL)
    endpoint(tabs["ship"].merge_check, "merge_check", **ON_MODEL)
    endpoint(tabs["parity"].parity, "parity", **ON_MODEL)
