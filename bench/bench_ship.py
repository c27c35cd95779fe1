"""The merge check on the embedded default: its time for three routes (nf4, bf16, fp32) and 20 catalog items
(issue target: under 10 s), for all five routes, and the weights-only part; peak memory against the model's
footprint.

    python bench/bench_ship.py [--items 20] [--as-avx2] [--out bench/results/ship.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # as app.py does, before torch loads

from bench.bench_engine import AS_AVX2, run_fields  # noqa: E402


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
    parser.add_argument("--as-avx2", action="store_true", help="as bench_engine.py's --as-avx2")
    parser.add_argument("--out", default="bench/results/ship.json")
    args = parser.parse_args(argv)
    if args.as_avx2 and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        os.environ.update(AS_AVX2)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    from utils.analysis import merge_check
    from utils.core.profiles import read_settings
    from utils.runtime.engine import Engine
    from utils.runtime.loading import load_model_pair
    from utils.task import ship
    from utils.task.catalog import load_split
    from utils.task.pricing import build_prompt

    pair = load_model_pair(replace(read_settings(), profile="smollm2-pricer", adapters=()), has_gpu=False)
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
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    for key, value in out.items():
        print(f"{key}: {value:,.3f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
