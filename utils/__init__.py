"""LoRA Lens without its UI, in four layers; each sub-package's docstring says what it may import.

- `utils.core`: errors, settings and profiles, input checks, and the seam (`utils.core.seam.Backend`) between
  the views and whatever runs the model. Standard library only.
- `utils.runtime`: the in-process engine behind the seam (transformers, peft, bitsandbytes, the compiled CPU
  kernels), loading, the embedded model. The only home of peft and bitsandbytes.
- `utils.analysis`: what the lens computes about a fine-tune (token lens, adapter anatomy, architecture, size
  math). Runs the model only through the seam.
- `utils.task`: the pricer task (synthetic catalog, price reading and metrics, evaluation, training).

Nothing here imports gradio: presentation (HTML, charts, tables, API JSON) lives in `ui/`.
"""
