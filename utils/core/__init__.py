"""What every layer shares: errors (`errors`), settings and model profiles (`profiles`, the only reader of
the environment), input checks (`inputs`), the seam between the views and an engine (`seam`), panes over
several adapters (`panes`), prompt formats (`prompt_format`, with `template_sandbox` rendering chat
templates and `row_prompts` saying which prompt each batch row runs on), and the ZeroGPU budget (`gpu_budget`).

May import the standard library only (at import time; `profiles.gpu_available` asks torch lazily, and
`template_sandbox` jinja2 when it renders), so the UI's presentation, a remote backend and the tests can use
it without loading torch.
"""
