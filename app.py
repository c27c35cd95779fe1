"""LoRA Lens: what a LoRA / QLoRA fine-tune changes, base and fine-tuned side by side from one 4-bit model.

A thin Gradio layer over utils/: build_demo() returns the Blocks, handlers call utils and turn its errors into
gr.Error / gr.Warning. The model is loaded once at start (at module level, as ZeroGPU requires).
"""

from __future__ import annotations

import spaces  # noqa: F401  (must come before anything initialises CUDA on ZeroGPU)

import argparse
import logging

import gradio as gr

from utils.loading import LoadedPair, load_model_pair
from utils.profiles import PROFILE_CHOICES, read_settings

log = logging.getLogger("lora_lens")


def load_models(settings=None) -> LoadedPair:
    """The one model the app holds; printed at start so the logs say what is served."""
    settings = settings or read_settings()
    pair = load_model_pair(settings)
    print(pair.report.as_text(), flush=True)
    return pair


def build_demo(pair: LoadedPair) -> gr.Blocks:
    with gr.Blocks(title="LoRA Lens") as demo:
        gr.Markdown("# LoRA Lens\nWhat a LoRA fine-tune changes: base and fine-tuned from one 4-bit model.")
        gr.Textbox(value=pair.report.as_text(), label="Loaded models", lines=7, interactive=False)
    return demo


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Launch LoRA Lens.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to serve a network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--profile", choices=PROFILE_CHOICES, help="overrides LORA_LENS_PROFILE")
    return parser.parse_args(argv)


if __name__ == "__main__":
    import os

    args = parse_args()
    if args.profile:
        os.environ["LORA_LENS_PROFILE"] = args.profile
    logging.basicConfig(level=logging.INFO)
    build_demo(load_models()).launch(server_name=args.host, server_port=args.port, share=args.share)
