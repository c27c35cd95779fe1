"""The in-process engine: the NF4 base and its LoRA adapter in this process, behind `utils.core.seam.Backend`.

- `loading`, `adapter_files`, `embedded`: load the base in 4-bit (or full precision), check and attach the
  adapter, convert the embedded GGUF once; `tiny` builds random tiny models for tests and benchmarks.
- `engine`: `Engine`, the seam's in-process implementation; `router`: every LoRA layer's update scaled per
  batch row (and per layer); `generation`: what generate() is handed; `scoring`: logits to plain values;
  `threads`: CPU threads of the engine's own threads; `weights`: the adapter's and the base's weights.
- `nf4_kernel`, `decode_layers`, `cpu_decode`: the compiled CPU decode paths (sources in csrc/).

May import `utils.core`, torch, transformers, peft and bitsandbytes; never `utils.analysis`, `utils.task`, ui
or gradio. The only place a model with weights is loaded and run.
"""
