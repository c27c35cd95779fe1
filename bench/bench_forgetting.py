"""The forgetting check on the embedded default: how long the whole general-text sample takes under the base
and the fine-tune (issue target: under 15 s), and the scoring rate in tokens a second.

    python bench/bench_forgetting.py [--passages 96] [--as-avx2] [--out bench/results/forgetting.json]
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=96)
    args = parse_bench_args(parser, argv, "bench/results/forgetting.json")
    from utils.core.seam import Use
    from utils.runtime.engine import Engine
    from utils.task import forgetting

    pair = embedded_pair()
    engine = Engine(pair)
    passages = forgetting.load_passages(engine, args.passages)
    models = {"base": Use(None, 0.0), "fine_tuned": Use("fine_tuned", 1.0)}
    list(forgetting.score_passages(engine, passages[:1], models))  # warm-up
    started = time.perf_counter()
    scored = [p for batch in forgetting.score_passages(engine, passages, models) for p in batch]
    seconds = time.perf_counter() - started
    report = forgetting.build_report(scored, models, seconds)
    tokens = sum(len(p.token_ids) for p in passages)
    result = {
        **run_fields(pair, args.as_avx2),
        "passages": len(passages),
        "sample_tokens": tokens,
        "seconds": seconds,
        "tokens_read_per_s": tokens * len(models) / seconds,
        "target_s": 15,
        **{f"{name}_{key}": value for name, t in report.totals.items() for key, value in t.items()},
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
