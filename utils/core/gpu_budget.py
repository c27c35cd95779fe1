"""How long a ZeroGPU task should be reserved for: a model of the work, not a guess per call.

On ZeroGPU every `@spaces.GPU` call asks for a duration up front. The visitor's quota must cover it before the
task is scheduled, shorter tasks are queued first, and a duration above the platform's ceiling (about 300 s for
a logged-in visitor, less for one who is not) is refused. So the reservation is computed from what the call
will do:

    seconds = margin x (worker start + prefill tokens / prefill rate + decode steps / step rate)

capped at `max_s`. A batch decodes all its rows in the same steps, so the step count does not grow with the
rows; the prefill does, by the tokens it reads. The step rate is the configured one until runs have been
measured, then the slowest of the recent measured rates (a slower GPU lengthens the reservation, a faster one
shortens it). Evaluations are split into calls of at most `call_s` each (`chunks`).

Example: GpuBudget().seconds(Work(prefill_tokens=2 * 60, steps=64)) == 16
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

# The defaults, for an 8B model in NF4 on a ZeroGPU slice (half an H200), with headroom; README "ZeroGPU".
START_S = 8.0  # a worker's start: fork, CUDA context, the packed 4-bit weights moved onto the GPU
STEPS_PER_S = 15.0  # greedy decode steps of one batch through bitsandbytes' 4-bit kernels and peft's LoRA
PREFILL_TOKENS_PER_S = 2000.0  # prompt tokens read per second (all rows together)
MAX_S = 120  # no call asks for more: well under the ceiling, and within a visitor's daily quota
CALL_S = 60  # an evaluation is split into calls of at most this each, with progress between them
MARGIN = 1.25  # a reservation is this much above the model's estimate
MEASURED_RUNS = 8  # the step rate is the slowest of this many recent measured runs
MIN_MEASURED_STEPS = 16  # shorter runs are too noisy to measure a rate from


@dataclass(frozen=True)
class Work:
    """What one GPU call does: prompt tokens read (over all rows) and decode steps (one per generated token)."""

    prefill_tokens: int = 0
    steps: int = 0

    def __add__(self, other: Work) -> Work:
        return Work(self.prefill_tokens + other.prefill_tokens, self.steps + other.steps)


def generation(prompt_tokens: int, rows: int, max_new_tokens: int) -> Work:
    """One batch of `rows` rows over the same prompt, `max_new_tokens` steps."""
    return Work(prefill_tokens=prompt_tokens * rows, steps=max_new_tokens)


def scoring(tokens: int, rows: int) -> Work:
    """One teacher-forced batch: every row reads `tokens` tokens, nothing is generated."""
    return Work(prefill_tokens=tokens * rows)


class GpuBudget:
    """The duration model of every GPU call, with the figures it uses (README "ZeroGPU" says how to tune them)."""

    def __init__(
        self,
        start_s: float = START_S,
        steps_per_s: float = STEPS_PER_S,
        prefill_tokens_per_s: float = PREFILL_TOKENS_PER_S,
        max_s: int = MAX_S,
        call_s: int = CALL_S,
        margin: float = MARGIN,
    ):
        if min(steps_per_s, prefill_tokens_per_s, margin) <= 0 or start_s < 0 or not 0 < call_s <= max_s:
            raise ValueError("rates and the margin must be positive, and 0 < call_s <= max_s")
        self.start_s, self.configured_steps_per_s = start_s, steps_per_s
        self.prefill_tokens_per_s, self.max_s, self.call_s, self.margin = (
            prefill_tokens_per_s,
            max_s,
            call_s,
            margin,
        )
        self._measured: deque[float] = deque(maxlen=MEASURED_RUNS)

    @property
    def steps_per_s(self) -> float:
        """The slowest recently measured step rate, or the configured one before any run was measured."""
        return min(self._measured) if self._measured else self.configured_steps_per_s

    @property
    def measured(self) -> bool:
        return bool(self._measured)

    def observe(self, steps: int, seconds: float) -> None:
        """A finished run's decode: `steps` steps after the first in `seconds` (shorter runs are ignored)."""
        if steps >= MIN_MEASURED_STEPS and seconds > 0:
            self._measured.append(steps / seconds)

    def estimate(self, work: Work, extra_s: float = 0) -> float:
        """The model's seconds for `work` (plus `extra_s` of other work), margin included, before the cap."""
        busy = work.prefill_tokens / self.prefill_tokens_per_s + work.steps / self.steps_per_s + extra_s
        return self.margin * (self.start_s + busy)

    def seconds(self, work: Work, extra_s: float = 0) -> int:
        """The duration to ask spaces.GPU for: the estimate rounded up, at most max_s."""
        return min(self.max_s, math.ceil(self.estimate(work, extra_s)))

    def chunks(self, works: Sequence[Work]) -> list[range]:
        """Consecutive units (batches) grouped into calls of at most call_s each (a unit over it goes alone)."""
        out: list[range] = []
        start, total = 0, Work()
        for i, work in enumerate(works):
            if i > start and self.estimate(total + work) > self.call_s:
                out.append(range(start, i))
                start, total = i, Work()
            total += work
        if works:
            out.append(range(start, len(works)))
        return out

    def figures(self) -> dict[str, float]:
        """The figures in use, for the log and the README."""
        return {
            "start_s": self.start_s,
            "steps_per_s": round(self.steps_per_s, 2),
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "max_s": self.max_s,
            "call_s": self.call_s,
            "margin": self.margin,
        }
