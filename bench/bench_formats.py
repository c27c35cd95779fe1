"""Prompt formats on the embedded default: what rendering costs (the base's chat template in-process, a
visitor's template in its isolated interpreter), and the decode step of two panes in one shared format against
two panes in different formats (rows of different lengths, left padded), as ratios taken in one run.

    python bench/bench_formats.py [--tokens 48] [--repeats 3] [--as-avx2] [--out bench/results/formats.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # as app.py does, before torch loads

from bench.bench_engine import embedded_pair, parse_bench_args, run_fields, write_result  # noqa: E402

PROMPT = "Write a haiku about autumn leaves."
CUSTOM = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n"
)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def step_ms(engine, rows, tokens: int) -> float:
    """Milliseconds per decode step of these rows (prefill left out), on their own formatted prompts."""
    from utils.core.seam import GenerationSettings

    result = engine.run_rows(PROMPT, rows, GenerationSettings(max_new_tokens=tokens, ignore_eos=True))
    state = result.panes[rows[0].key]
    return (state.last_token_s - state.first_token_s) / (state.tokens - 1) * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_bench_args(parser, argv, "bench/results/formats.json")
    from utils.core.prompt_format import PromptFormat, format_rows, render_prompt
    from utils.core.seam import BASE, FINE_TUNED
    from utils.runtime.engine import Engine

    pair = embedded_pair()
    engine = Engine(pair)
    raw, chat = PromptFormat(), PromptFormat("chat")
    both = engine.rows_for("both")
    cases = {
        "shared_raw": {BASE: raw, FINE_TUNED: raw},
        "shared_chat": {BASE: chat, FINE_TUNED: chat},
        "base_raw_tuned_chat": {BASE: raw, FINE_TUNED: chat},
    }
    formatted = {
        name: format_rows(engine, PROMPT, both, formats, args.tokens) for name, formats in cases.items()
    }
    step_ms(engine, formatted["shared_raw"][0], 4)  # warm-up: kernels, caches
    steps = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved, so a busy moment of the machine falls on every case alike
        for name, (rows, _) in formatted.items():
            steps[name].append(step_ms(engine, rows, args.tokens))
    step = {name: statistics.median(values) for name, values in steps.items()}
    result = {
        **run_fields(pair, args.as_avx2),
        "tokens": args.tokens,
        "prompt_tokens": {
            name: [len(r.ids) for r in rendered.values()] for name, (_, rendered) in formatted.items()
        },
        "render_chat_ms": median_ms(lambda: render_prompt(engine, PROMPT, chat, None, 64), 50),
        "render_custom_isolated_ms": median_ms(
            lambda: render_prompt(engine, PROMPT, PromptFormat("custom", template=CUSTOM), None, 64), 5
        ),
        **{f"step_ms_{name}": value for name, value in step.items()},
        "tokens_per_s_per_pane_mixed_formats": 1000 / step["base_raw_tuned_chat"],
        "mixed_over_shared_chat": step["base_raw_tuned_chat"] / step["shared_chat"],
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
