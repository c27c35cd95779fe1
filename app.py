"""LoRA Lens: what a LoRA / QLoRA fine-tune changes, base and fine-tuned side by side from one 4-bit model.

The entry point: `build_demo(pair_or_engine)` assembles the header, the tabs (each in its own module under
ui/, with its layout, handlers and API endpoints) and the named API; `launch()` serves it with the app's
theme. The model is loaded once, in the `__main__` path by `load_models()`, at module level as ZeroGPU
requires.
"""

import os

# One OpenMP thread for every thread but the engine's own: generation and the token lens run in threads of
# their own on LORA_LENS_CPU_THREADS threads (utils/runtime/engine.py: torch_threads), and a second live OpenMP team
# (one of 2 threads here, in the main thread) makes libgomp sleep between the small kernels of a decode step,
# which halves decode speed (bench/bench_engine.py). Set before torch loads, which reads it once.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import spaces  # noqa: E402, F401  must come before anything initialises CUDA; a no-op off ZeroGPU

# isort: split
import argparse
import functools
import logging
from dataclasses import replace

import gradio as gr

from ui import (
    adapters,
    anatomy,
    api,
    architecture,
    compare,
    evaluate,
    forgetting,
    parity,
    ship,
    size,
    sweep,
    token_lens,
    views,
)
from ui.common import CSS, ON_MODEL, PRIVATE, QUEUE_MAX_SIZE, theme
from ui.lens import Lens, backend_status, model_concurrency
from utils.core.profiles import PROFILE_CHOICES, read_settings
from utils.runtime.loading import LoadedPair, load_model_pair


def load_models(settings=None, profile: str | None = None) -> LoadedPair:
    """The one model the app holds (base + adapter); printed at start so the logs say what is served."""
    settings = settings or read_settings()
    if profile:
        settings = replace(settings, profile=profile)
    print(f"LoRA Lens: loading profile {settings.profile!r} ({settings.precision}) ...", flush=True)
    pair = load_model_pair(settings)
    print(pair.report.as_text(), flush=True)
    print(
        f"LoRA Lens: cold start {pair.report.load_seconds:.1f} s (download, quantization, adapter)",
        flush=True,
    )
    return pair


def load_backends(settings=None, profile: str | None = None) -> tuple:
    """(what the views run on, the other backend serving parity compares it with, or None).

    LORA_LENS_BACKEND=vllm: the views run on the server at LORA_LENS_VLLM_URL, and LORA_LENS_PARITY=1 loads the
    in-process engine too, as the reference. LORA_LENS_BACKEND=local (default) with LORA_LENS_VLLM_URL set: the
    views run here and parity compares the server with them.
    """
    settings = settings or read_settings()
    if profile:
        settings = replace(settings, profile=profile)
    serving = settings.serving
    if not serving.parity_available and not serving.remote:
        return load_models(settings), None
    from utils.serving.backend import connect

    served = connect(settings)
    print(f"LoRA Lens: {served.status()}", flush=True)
    if serving.remote:
        return served, (load_models(settings) if serving.parity else None)
    return load_models(settings), served


def launch(demo: gr.Blocks, **kwargs):
    """demo.launch() with the app's theme and error settings; kwargs (server_name, server_port ...) pass on.

    show_error=False: unexpected exceptions show a generic message; utils' messages arrive as gr.Error.
    A kwarg given as None is left out, so gradio resolves it itself: GRADIO_SERVER_NAME / GRADIO_SERVER_PORT,
    which a Space sets to 0.0.0.0 and its port (an explicit server_name would win over them).
    """
    options = dict(theme=theme(), css=CSS, show_error=False, footer_links=["api", "gradio", "settings"])
    options.update({name: value for name, value in kwargs.items() if value is not None})
    return demo.launch(**options)


def build_demo(pair_or_engine, counterpart=None) -> gr.Blocks:
    """The whole app for one loaded pair (or a Backend: the Engine over one, or a server's): header, tabs, and
    the API endpoints. `counterpart`, a second backend (load_backends), makes the Serving parity tab work.

    Launch it with `launch(demo, ...)` (the app's theme and error settings) or demo.launch(...).
    """
    lens = Lens(pair_or_engine, counterpart=counterpart)
    # a server batches requests itself: the app sends it several at once (the in-process engine takes one)
    ON_MODEL["concurrency_limit"] = model_concurrency(lens)
    tabs = {
        "compare": compare.CompareTab(lens),
        "sweep": sweep.SweepTab(lens),
        "architecture": architecture.ArchitectureTab(lens),
        "size": size.SizeTab(lens),
        "evaluate": evaluate.EvaluateTab(lens),
        "token_lens": token_lens.TokenLens(lens),
        "anatomy": anatomy.AnatomyTab(lens),
    }
    tabs["adapters"] = adapters.AdaptersTab(lens, tabs["anatomy"].anatomy_data)
    tabs["forgetting"] = forgetting.ForgettingCheck(lens)
    tabs["ship"] = ship.ShipTab(lens)
    tabs["parity"] = parity.ParityTab(lens)
    with gr.Blocks(title="LoRA Lens", analytics_enabled=False) as demo:
        stop = gr.State(views.StopSignal())
        gr.HTML(
            views.header_html(lens.report, lens.profile),
            css_template=views.HEADER_CSS,
            elem_id="lens-header",
        )
        status = backend_status(lens)
        if status:  # a server runs the model: its reachability, asked again on every page load
            status_line = gr.Markdown(status, elem_id="lens-backend-status")
            demo.load(functools.partial(backend_status, lens), outputs=[status_line], queue=False, **PRIVATE)
        with gr.Tabs() as tab_set:
            with gr.Tab("Compare", id="compare"):
                compare_prompt = compare.layout(tabs["compare"], stop)
            with gr.Tab("Strength sweep", id="sweep"):
                sweep.layout(tabs["sweep"], stop)
            with gr.Tab("Adapters", id="adapters", visible=len(lens.info.adapters) > 1):
                adapters.layout(tabs["adapters"])
            with gr.Tab("Architecture", id="architecture"):
                arch_module, arch_open = architecture.layout(tabs["architecture"])
            with gr.Tab("Adapter anatomy", id="anatomy") as anatomy_tab:
                anatomy_parts = anatomy.layout(tabs["anatomy"])
            with gr.Tab("Size math", id="size"):
                size.layout(tabs["size"])
            with gr.Tab("Evaluate", id="evaluate"):
                flips = evaluate.layout(tabs["evaluate"])
                forgetting.layout(tabs["forgetting"])
            with gr.Tab("Ship", id="ship"):
                ship.layout(tabs["ship"])
            with gr.Tab("Serving parity", id="parity"):
                parity.layout(tabs["parity"])
        if flips is not None:
            # A flipped item opens in Compare, in the task prompt, ready to run.
            flips.select(
                tabs["compare"].ui_open_item,
                outputs=[tab_set, compare_prompt],
                queue=False,
                **PRIVATE,
            )
        if anatomy_parts is not None:
            # The anatomy is computed on first open (on ZeroGPU it needs a GPU call), then cached.
            fill, fill_inputs, fill_outputs = anatomy_parts["open"]
            anatomy_tab.select(fill, inputs=fill_inputs, outputs=fill_outputs, **ON_MODEL, **PRIVATE)
            if arch_open is not None:
                arch_open.click(
                    lambda value: (gr.Tabs(selected="anatomy"), value),
                    inputs=[arch_module],
                    outputs=[tab_set, anatomy_parts["module"]],
                    queue=False,
                    **PRIVATE,
                ).then(fill, inputs=fill_inputs, outputs=fill_outputs, **ON_MODEL, **PRIVATE)
        api.register(tabs)
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=2)
    return demo


def create_app(settings=None, profile: str | None = None) -> gr.Blocks:
    """load_models() + build_demo(): the app as `python app.py` serves it."""
    return build_demo(*load_backends(settings, profile))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Launch LoRA Lens.")
    # No defaults here: left out, gradio reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (set on a Space),
    # else binds 127.0.0.1 and the first free port from 7860.
    parser.add_argument(
        "--host",
        help="address to bind (0.0.0.0 to serve a network; default $GRADIO_SERVER_NAME or 127.0.0.1)",
    )
    parser.add_argument("--port", type=int, help="port to bind (default $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--profile", choices=PROFILE_CHOICES, help="overrides LORA_LENS_PROFILE")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    logging.basicConfig(level=logging.INFO)
    # module level: ZeroGPU places the model before the server starts
    MAIN, COUNTERPART = load_backends(profile=args.profile)
    launch(build_demo(MAIN, COUNTERPART), server_name=args.host, server_port=args.port, share=args.share)
