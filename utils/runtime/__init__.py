"""The in-process engine: the NF4 base and its LoRA adapter in this process, behind `utils.core.seam.Backend`.

- `loading`, `adapter_files`, `embedded`: load the base in 4-bit (or full precision), check and attach the
  adapter, convert the embedded GGUF once; `tiny` builds random tiny models for tests and benchmarks.
- `engine`: `Engine`, the seam's in-process implementation; `router`: every LoRA layer's update scaled per
  batch row (and per layer); `generation`: what generate() is handed; `scoring`: logits to plain values;
  `threads`: CPU threads of the engine's own threads; `weights`: the adapter's and the base's weights.
- `nf4_kernel`, `decode_layers`, `cpu_decode`: the compiled CPU decode paths (sources in csrc/).
- `prompts`: each row's prompt ids and what prompt formats need; `merging`: an adapter merged into the base
  by route, merged copies run; `exports`: the scaled adapter, the GGUF LoRA and the merged model as files.

May import `utils.core`, torch, transformers, peft and bitsandbytes; never `utils.analysis`, `utils.task`, ui
or gradio. The only place a model with weights is loaded and run.
"""

import logging
import warnings


class _NoHubKernelNotice(logging.Filter):
    """Drops bitsandbytes' start-up warning "Failed to load CPU gemm_4bit_forward from kernels-community: No
    module named 'kernels'", logged on every CPU with AVX512-BF16. Nobody can act on it here: the kernel it
    names is code downloaded from the Hub at run time (through the `kernels` package), which this app never
    does, and without it bitsandbytes uses the fused AVX512-BF16 kernel compiled into its own library (the
    header names the kernel that serves the 4-bit layers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "from kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoHubKernelNotice())
# peft asks transformers' is_gradient_checkpointing on every model it wraps, which transformers 5 answers with
# a FutureWarning addressed to peft's authors; nothing a user of this app does can change it.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
