"""The ZeroGPU duration model (utils/core/gpu_budget.py): each figure's effect, the cap, measured rates, the
split of an evaluation into bounded calls, the LORA_LENS_GPU_* settings, and the README's table."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from utils.core.errors import ProfileError
from utils.core.gpu_budget import CALL_S, MAX_S, GpuBudget, Work, generation, scoring
from utils.core.profiles import read_settings

ROOT = Path(__file__).resolve().parent.parent
ZEROGPU_CEILING_S = (
    300  # ZeroGPU refuses a logged-in visitor's task above about this; less when not logged in
)


def test_the_estimate_is_start_plus_prefill_plus_steps_with_the_margin():
    budget = GpuBudget(start_s=10, steps_per_s=20, prefill_tokens_per_s=1000, margin=1.5)
    assert budget.estimate(Work(prefill_tokens=2000, steps=100)) == pytest.approx(1.5 * (10 + 2 + 5))
    assert budget.seconds(Work(prefill_tokens=2000, steps=100)) == math.ceil(1.5 * 17)
    assert budget.seconds(Work(), extra_s=4) == 21


def test_decode_steps_do_not_grow_with_the_rows():
    """A batch decodes every row in the same steps: only the prefill grows with the rows."""
    assert generation(100, 6, 512).steps == generation(100, 1, 512).steps == 512
    assert generation(100, 6, 512).prefill_tokens == 600
    assert scoring(300, 4) == Work(prefill_tokens=1200, steps=0)


def test_no_request_asks_above_the_cap():
    budget = GpuBudget()
    assert budget.seconds(generation(131_072, 6, 512)) == MAX_S
    assert MAX_S * 1.5 <= ZEROGPU_CEILING_S  # even where spaces scales durations by 1.5 (RTX PRO 6000)


def test_the_largest_allowed_requests_are_under_the_cap_before_capping():
    """An 8,000-token prompt (the 32,000-character limit at ~4 characters a token), 512 tokens: six sweep
    rows with their prices, or Compare with prices and the token lens, fit without the cap cutting them."""
    budget = GpuBudget()
    sweep = generation(8_000, 6, 512) + scoring(8_000, 6)
    compare = generation(8_000, 2, 512) + scoring(8_000, 2) + scoring(8_000 + 256, 4)
    assert budget.estimate(sweep) < MAX_S and budget.estimate(compare) < MAX_S


def test_a_measured_rate_replaces_the_configured_one_and_the_slowest_counts():
    budget = GpuBudget(steps_per_s=15)
    budget.observe(8, 0.1)  # too short to measure
    assert budget.steps_per_s == 15 and not budget.measured
    budget.observe(100, 2.0)  # 50 steps/s
    budget.observe(100, 4.0)  # 25 steps/s
    assert budget.steps_per_s == 25 and budget.measured
    for _ in range(8):  # only the recent runs count
        budget.observe(100, 1.0)
    assert budget.steps_per_s == 100


def test_chunks_group_batches_under_the_call_limit():
    budget = GpuBudget(start_s=0, steps_per_s=1, prefill_tokens_per_s=1e6, margin=1.0, call_s=10, max_s=20)
    works = [Work(steps=4)] * 5 + [Work(steps=30)] + [Work(steps=1)]
    assert budget.chunks(works) == [range(0, 2), range(2, 4), range(4, 5), range(5, 6), range(6, 7)]
    assert budget.chunks([]) == []


@pytest.mark.parametrize(
    ("environ", "figures"),
    [
        ({}, {}),
        ({"LORA_LENS_GPU_STEPS_PER_S": "30"}, {"steps_per_s": 30.0}),
        ({"LORA_LENS_GPU_MAX_S": "90", "LORA_LENS_GPU_CALL_S": "45"}, {"max_s": 90, "call_s": 45}),
        (
            {"LORA_LENS_GPU_START_S": "0", "LORA_LENS_GPU_PREFILL_TOKENS_PER_S": "8000"},
            {"start_s": 0.0, "prefill_tokens_per_s": 8000.0},
        ),
    ],
)
def test_gpu_figures_are_read_from_the_environment(environ, figures):
    assert read_settings(environ).gpu_figures == figures
    GpuBudget(**figures)  # and they make a valid budget


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"LORA_LENS_GPU_STEPS_PER_S": "fast"}, "LORA_LENS_GPU_STEPS_PER_S='fast' is not a number from 0.5"),
        ({"LORA_LENS_GPU_MAX_S": "600"}, "from 10 to 300"),
        ({"LORA_LENS_GPU_STEPS_PER_S": "nan"}, "is not a number"),
        ({"LORA_LENS_GPU_CALL_S": str(MAX_S + 10)}, "must not exceed LORA_LENS_GPU_MAX_S"),
    ],
)
def test_bad_gpu_figures_are_refused_with_the_variable_named(environ, message):
    with pytest.raises(ProfileError, match=message):
        read_settings(environ)


def test_defaults_leave_an_evaluation_call_under_the_cap():
    assert 0 < CALL_S <= MAX_S


def test_the_readme_table_is_the_scripts_output():
    """README "ZeroGPU" carries scripts/gpu_durations.py's table under the default figures."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_durations.py")],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)},
    ).stdout.strip()
    assert out.startswith("| action | GPU calls |")
    assert out in (ROOT / "README.md").read_text()
