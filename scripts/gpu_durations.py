"""The ZeroGPU reservations of the app's GPU calls for the Llama 3.1 8B pricer, as a Markdown table.

Each row is one user action = one GPU call (an evaluation: several calls of at most LORA_LENS_GPU_CALL_S), with
the duration utils/core/gpu_budget.py asks for under the default figures (or the LORA_LENS_GPU_* set now).
The README's "ZeroGPU" section carries this table; tests/test_gpu_budget.py checks that it is current.

    python scripts/gpu_durations.py
"""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ui.anatomy import BLOCK_SIZE, SWEEP_TOKENS  # noqa: E402
from ui.compare import PRICE_TOKENS  # noqa: E402
from ui.durations import EVAL_BATCH, LENS_TOKENS, OWN_DATA_BATCH, pane_lens_tokens  # noqa: E402
from utils.core.gpu_budget import GpuBudget, Work, generation, scoring  # noqa: E402
from utils.core.inputs import MAX_NEW_TOKENS_RANGE, MAX_SWEEP_ROWS, N_ITEMS_RANGE  # noqa: E402
from utils.core.profiles import read_settings  # noqa: E402
from utils.task.evaluate import MAX_NEW_TOKENS as EVAL_TOKENS  # noqa: E402

LAYERS = 32  # Llama 3.1 8B
PRICER_PROMPT_TOKENS = 100  # the pricer's task prompt around a catalog description
LONG_PROMPT_TOKENS = 8_000  # the 32,000-character prompt limit at about 4 characters a token
ANSWER_TOKENS = 300  # a prompt and reference answer of your own data, together


def compare(prompt: int, new: int) -> Work:
    """Both panes, then the prices and the token lens in the same call."""
    return generation(prompt, 2, new) + scoring(prompt, 2) + scoring(prompt + min(new, LENS_TOKENS), 4)


def rows() -> list[tuple[str, list[Work]]]:
    longest = MAX_NEW_TOKENS_RANGE[1]
    blocks = 1 + math.ceil(LAYERS / BLOCK_SIZE)
    catalog = Work(
        EVAL_BATCH * PRICER_PROMPT_TOKENS * 8, EVAL_TOKENS
    )  # 8 panes: base, fine-tune, 6 strengths
    own = Work(4 * OWN_DATA_BATCH * ANSWER_TOKENS, 256)
    return [
        (
            "Compare, pricer prompt, 64 tokens (panes, prices, token lens)",
            [compare(PRICER_PROMPT_TOKENS, 64)],
        ),
        (
            f"Compare, {LONG_PROMPT_TOKENS:,}-token prompt, {longest} tokens",
            [compare(LONG_PROMPT_TOKENS, longest)],
        ),
        (
            f"Strength sweep, {MAX_SWEEP_ROWS} strengths, {LONG_PROMPT_TOKENS:,}-token prompt, {longest} tokens, prices",
            [
                generation(LONG_PROMPT_TOKENS, MAX_SWEEP_ROWS, longest)
                + scoring(LONG_PROMPT_TOKENS, MAX_SWEEP_ROWS)
            ],  # the token lens across the panes is left out: it would read more than PANE_LENS_TOKENS
        ),
        (
            f"Strength sweep, {MAX_SWEEP_ROWS} panes, pricer prompt, 64 tokens, prices, token lens across the panes",
            [
                generation(PRICER_PROMPT_TOKENS, MAX_SWEEP_ROWS, 64)
                + scoring(PRICER_PROMPT_TOKENS, MAX_SWEEP_ROWS)
                + scoring(pane_lens_tokens(PRICER_PROMPT_TOKENS, MAX_SWEEP_ROWS, 64), 1)
            ],
        ),
        (
            "/estimate_price",
            [generation(PRICER_PROMPT_TOKENS, 2, PRICE_TOKENS) + scoring(PRICER_PROMPT_TOKENS, 2)],
        ),
        (
            f"Block sweep ({blocks} rows)",
            [
                generation(PRICER_PROMPT_TOKENS, blocks, SWEEP_TOKENS)
                + scoring(PRICER_PROMPT_TOKENS + SWEEP_TOKENS, blocks)
            ],
        ),
        (
            f"Evaluate, {N_ITEMS_RANGE[1]} items x 8 panes",
            [catalog] * math.ceil(N_ITEMS_RANGE[1] / EVAL_BATCH),
        ),
        (
            f"Your own data, {N_ITEMS_RANGE[1]} examples, 256 tokens",
            [own] * math.ceil(N_ITEMS_RANGE[1] / OWN_DATA_BATCH),
        ),
    ]


def table(budget: GpuBudget) -> str:
    lines = ["| action | GPU calls | seconds asked (each) |", "|---|---:|---|"]
    for name, works in rows():
        calls = budget.chunks(works)
        asked = [budget.seconds(sum((works[i] for i in call), Work())) for call in calls]
        shown = ", ".join(str(s) for s in sorted(set(asked), reverse=True))
        lines.append(f"| {name} | {len(calls)} | {shown} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(GpuBudget(**read_settings().gpu_figures)))
