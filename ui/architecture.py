"""The Architecture tab: the loaded model's printout without and with the adapter (its lines marked, LoRA
matrices annotated), and the Llama-3.1-8B reference built on the meta device; plus /architecture."""

import gradio as gr

from ui import views
from ui.common import code, user_errors
from ui.lens import Lens


class ArchitectureTab:
    def __init__(self, lens: Lens):
        self.lens = lens
        self._loaded_views = None

    def loaded_views(self):
        from utils.analysis.architecture import architecture_views

        if self._loaded_views is None:
            self._loaded_views = architecture_views(None, self.lens.backend.loaded_model())
        return self._loaded_views

    @user_errors
    def architecture(self) -> dict:
        """The loaded model's printouts: the base as loaded, the PEFT model, and the diff marking the adapter.

        Returns:
            architecture: {"loaded": {"base", "peft", "diff", "added_lines"}, "reference": the same for
            Llama-3.1-8B + the pricer LoRA built on the meta device (null when that is the loaded model)}
        """
        from utils.analysis.architecture import reference_views

        reference = views.architecture_json(reference_views()) if self.lens.show_reference else None
        return {"loaded": views.architecture_json(self.loaded_views()), "reference": reference}

    @user_errors
    def ui_reference_architecture(self):
        """The reference pair's printouts, built on the meta device (a second or two, then cached)."""
        from utils.analysis.architecture import reference_views

        ref = reference_views()
        note = (
            f"Built from configs/llama-3.1-8b on the meta device (no weights, no memory): NF4 layers in place, "
            f"LoRA r = 32 on q/k/v/o. The adapter added {ref.added_lines} lines."
        )
        return ref.base_text, ref.diff_text, note

    def _module_opener(self) -> tuple:
        """Every lora_A / lora_B pair of the printout, openable in the Anatomy tab (None without an adapter)."""
        names = self.lens.info.lora_layers
        if not names:
            return None, None
        from utils.analysis.anatomy import parse_module_name

        choices = []
        for name in names:
            layer, module = parse_module_name(name)
            choices.append((f"layers.{layer}.{module}: lora_A / lora_B", f"{layer}:{module}"))
        with gr.Row():
            selector = gr.Dropdown(
                choices,
                value=choices[0][1],
                label="Open a LoRA module's anatomy (its update's size and singular values)",
                scale=4,
                elem_id="lens-arch-module",
            )
            button = gr.Button("Open in Adapter anatomy", scale=1, elem_id="lens-arch-open")
        return selector, button


def layout(tab: ArchitectureTab) -> tuple:
    """The tab; returns (module selector, open button) for opening a LoRA module in the Anatomy tab."""
    loaded = tab.loaded_views()
    gr.Markdown(
        "The printout of the loaded model, without and with the adapter. On the right, `+` marks every line "
        f"the adapter added ({loaded.added_lines} here); `lora_A` / `lora_B` carry their shapes and "
        "parameter counts. Repeated decoder layers are folded (`(0-29): 30 x ...`)."
    )
    with gr.Row():
        code(loaded.base_text, "Base as loaded (adapter detached)", "lens-arch-base")
        code(
            loaded.diff_text,
            "PEFT model (+ = added by the adapter)",
            "lens-arch-peft",
            "python",
            wrap=True,
        )
    opener = tab._module_opener()
    if not tab.lens.show_reference:
        return opener
    gr.Markdown("### Reference: Llama-3.1-8B with the pricer LoRA (r = 32, q/k/v/o)")
    try:
        base_text, diff_text, note = tab.ui_reference_architecture()
    except gr.Error as exc:  # a broken reference config must not stop the app
        gr.Markdown(f"The reference could not be built: {exc.message}")
        return opener
    gr.Markdown(note)
    with gr.Row():
        code(base_text, "Llama-3.1-8B in NF4", "lens-ref-base")
        code(diff_text, "Llama-3.1-8B + LoRA (PEFT)", "lens-ref-peft", "python", wrap=True)
    return opener
