"""The merge check on the embedded default: its time for three routes (nf4, bf16, fp32) and 20 catalog items
(issue target: under 10 s), for all five routes, and the weights-only part; peak memory against the model's
footprint.

    python bench/bench_ship.py [--items 20] [--as-avx2] [--out bench/results/ship.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # as app.py does, before torch loads

from bench.bench_engine import embedded_pair, parse_bench_args, run_fields, write_result  # noqa: E402


class PeakMemory:
    """The largest resident size seen while a block runs (sampled every 10 ms in a thread)."""

    def __enter__(self):
        import threading

        import psutil

        self.process, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.start = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20)
    args = parse_bench_args(parser, argv, "bench/results/ship.json")
    from utils.analysis import merge_check
    from utils.runtime.engine import Engine
    from utils.task import ship
    from utils.task.catalog import load_split
    from utils.task.pricing import build_prompt

    pair = embedded_pair()
    engine = Engine(pair)
    prompt = build_prompt(load_split("test", 1)[0].description, pair.profile.task_prompt)
    ship.run_check(engine, pair.profile, "fine_tuned", prompt, 1, run_routes=("fp32",))  # warm-up
    started = time.perf_counter()
    with engine.adapter_weights() as layers:
        routes, _ = merge_check.available_routes(layers)
        merge_check.survival(layers, routes)
    weights_s = time.perf_counter() - started
    timings, peaks = {}, {}
    for name, routes_run in (("three_routes", ("nf4", "bf16", "fp32")), ("all_routes", None)):
        started = time.perf_counter()
        with PeakMemory() as memory:
            result = ship.run_check(
                engine, pair.profile, "fine_tuned", prompt, args.items, run_routes=routes_run
            )
        timings[name] = time.perf_counter() - started
        peaks[name] = memory.peak - memory.start
    check = result.check
    out = {
        **run_fields(pair, args.as_avx2),
        "items": args.items,
        "weights_only_s": weights_s,
        "three_routes_s": timings["three_routes"],
        "all_routes_s": timings["all_routes"],
        "target_s": 10,
        "model_footprint_bytes": pair.report.footprint_with_adapter_bytes,
        "peak_added_three_routes_bytes": peaks["three_routes"],
        "peak_added_all_routes_bytes": peaks["all_routes"],
        "peak_added_three_routes_over_footprint": peaks["three_routes"]
        / pair.report.footprint_with_adapter_bytes,
        "peak_added_all_routes_over_footprint": peaks["all_routes"]
        / pair.report.footprint_with_adapter_bytes,
        "verdict": check.verdict(),
        "routes": {
            route: {
                "median_lost": check.median_lost(route),
                "worst_lost": check.worst_lost(route),
                "mean_kl": check.mean_kl(route),
                "same_answers": check.same_answers(route),
                **{k: result.metrics.get(route, {}).get(k) for k in ("mae", "hit_rate")},
            }
            for route in check.routes
        },
        "unmerged": {k: result.metrics["unmerged"][k] for k in ("mae", "hit_rate")},
    }
    write_result(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
