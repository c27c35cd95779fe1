"""The Serving parity tab: the served fine-tune (a vLLM server) against the in-process reference of the same
adapter, for a prompt and for evaluation items (utils/analysis/parity.py), and /parity. Available where both
backends are configured; otherwise it says how to configure them."""

import gradio as gr

from ui.common import ON_MODEL, PRIVATE, TABLE, unchanged, user_errors
from ui.lens import Lens, backend_status
from ui.views import parity as views
from utils.core.errors import InputError
from utils.core.inputs import clean_prompt, parse_number, require_range

MAX_NEW_TOKENS = (1, 128)
ITEMS = (1, 50)
GENERAL_PROMPT = "Once upon a time, in a small town by the sea,"


class ParityTab:
    def __init__(self, lens: Lens):
        self.lens = lens

    def check(self, prompt: str, max_new_tokens: int):
        """Serving parity of both panes for one prompt (utils/analysis/parity.py)."""
        from utils.analysis.parity import check_prompt

        reference, served = self._backends()
        text, _ = clean_prompt(prompt)
        return check_prompt(reference, served, text, max_new_tokens)

    def check_items(self, n_items: int, max_new_tokens: int):
        """Serving parity over the first n evaluation items of the task (the pricer's test split)."""
        from utils.analysis.parity import check_items
        from utils.task.catalog import example_descriptions
        from utils.task.pricing import build_prompt

        self.lens.require_pricer("Parity over evaluation items")
        reference, served = self._backends()
        prompts = [build_prompt(d, self.lens.profile.task_prompt) for d in example_descriptions(n_items)]
        return check_items(reference, served, prompts, max_new_tokens)

    def _backends(self):
        if self.lens.parity_pair is None:
            raise InputError(
                "Serving parity needs both backends: set LORA_LENS_VLLM_URL to a vLLM server (the views keep "
                "running here), or LORA_LENS_BACKEND=vllm with LORA_LENS_PARITY=1 (the views run on the "
                "server and the in-process engine loads as the reference)."
            )
        return self.lens.parity_pair

    @user_errors
    def parity(self, prompt: str, max_new_tokens: int = 32, n_items: int = 0) -> dict:
        """Serving parity: the served model against the in-process reference of the same adapter.

        Each pane (base, fine-tuned) generates greedily on both backends; each pane's texts are scored
        teacher-forced on both, token by token. Needs both backends (LORA_LENS_VLLM_URL, see the README).
        Args:
            prompt: the prompt, as Compare takes it (raw text)
            max_new_tokens: tokens per pane, 1-128
            n_items: also this many of the task's evaluation items, 0-50 (pricer profiles only)
        Returns:
            {"prompt_tokens", "max_new_tokens", "reference", "served", "panes": {pane: {"key",
            "reference_text", "served_text", "greedy_match", "first_divergence", "tokens_scored", "max_gap",
            "mean_gap", "largest": [{"position", "token", "token_id", "reference", "served", "gap"}]}},
            "items": {"items", "matches", "max_gap", "mean_gap", "per_item"} or null}. Gaps are log p served
            minus log p reference, in nats; max_gap and mean_gap are over their absolute values.
        """
        n, items = self._checked(max_new_tokens, n_items)
        result = self.check(prompt, n).as_json()
        result["items"] = self.check_items(items, n).as_json() if items else None
        return result

    @staticmethod
    def _checked(max_new_tokens, n_items) -> tuple[int, int]:
        n = parse_number("max_new_tokens", max_new_tokens, integer=True)
        require_range("max_new_tokens", n, MAX_NEW_TOKENS)
        items = parse_number("n_items", n_items or 0, integer=True)
        if items:
            require_range("n_items", items, ITEMS)
        return int(n), int(items)

    @user_errors
    def ui_parity(self, prompt, max_new_tokens):
        try:
            n, _ = self._checked(max_new_tokens, 0)
            result = self.check(prompt, n)
        except InputError as exc:
            return unchanged(exc, 3)
        return views.parity_markdown(result), views.texts_markdown(result), views.largest_rows(result)

    @user_errors
    def ui_items(self, n_items, max_new_tokens):
        try:
            n, items = self._checked(max_new_tokens, n_items)
            result = self.check_items(items, n)
        except InputError as exc:
            return unchanged(exc, 1)
        return views.items_markdown(result)

    @user_errors
    def ui_status(self):
        return backend_status(self.lens) or "The model runs in this process; no server is configured."


def layout(tab: ParityTab) -> None:
    lens = tab.lens
    gr.Markdown(
        "### Serving parity: the served fine-tune against the reference\n\n"
        "The same adapter on a vLLM server and in this process: each pane generates greedily on both, and "
        "every token of each pane's text is scored on both. Where the server holds the base in bf16 and the "
        "reference in 4-bit NF4 (a QLoRA adapter deployed the usual way), the gaps are that choice's cost."
    )
    status = gr.Markdown(backend_status(lens), elem_id="lens-parity-status")
    check = gr.Button("Check the server", size="sm", elem_id="lens-parity-ping")
    check.click(tab.ui_status, outputs=[status], **PRIVATE)
    if lens.parity_pair is None:
        gr.Markdown(
            "Not configured: set `LORA_LENS_VLLM_URL` to a vLLM server serving this base and adapter (the views "
            "keep running here), or `LORA_LENS_BACKEND=vllm` with `LORA_LENS_PARITY=1`. The README's "
            "*Serving from vLLM* says how to start one.",
            elem_id="lens-parity-missing",
        )
        return
    with gr.Row():
        prompt = gr.Textbox(default_prompt(lens), label="Prompt", lines=2, scale=4)
        max_new = gr.Slider(*MAX_NEW_TOKENS, value=32, step=1, label="Max new tokens per pane")
        run = gr.Button("Check parity", variant="primary", elem_id="lens-parity-run")
    summary = gr.Markdown(elem_id="lens-parity-summary", elem_classes=TABLE)
    texts = gr.Markdown(elem_id="lens-parity-texts")
    largest = gr.Dataframe(
        headers=views.LARGEST_HEADERS,
        label="The tokens where the two differ most",
        interactive=False,
        elem_id="lens-parity-largest",
    )
    run.click(
        tab.ui_parity, inputs=[prompt, max_new], outputs=[summary, texts, largest], **ON_MODEL, **PRIVATE
    )
    if lens.profile.is_pricer:
        with gr.Row():
            n_items = gr.Slider(*ITEMS, value=10, step=1, label="Evaluation items")
            run_items = gr.Button("Check over evaluation items", elem_id="lens-parity-items-run")
        items = gr.Markdown(elem_id="lens-parity-items", elem_classes=TABLE)
        run_items.click(tab.ui_items, inputs=[n_items, max_new], outputs=[items], **ON_MODEL, **PRIVATE)


def default_prompt(lens: Lens) -> str:
    """The task's first example item on a pricer profile (where the fine-tune differs most), else prose."""
    if not lens.profile.is_pricer:
        return GENERAL_PROMPT
    from utils.task.catalog import example_descriptions
    from utils.task.pricing import build_prompt

    return build_prompt(example_descriptions(1)[0], lens.profile.task_prompt)
