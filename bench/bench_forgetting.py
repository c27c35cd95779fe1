"""The forgetting check on the embedded default: how long the whole general-text sample takes under the base
and the fine-tune (issue target: under 15 s), and the scoring rate in tokens a second.

    python bench/bench_forgetting.py [--passages 96] [--as-avx2] [--out bench/results/forgetting.json]
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=96)
    parser.add_argument("--as-avx2", action="store_true", help="as bench_engine.py's --as-avx2")
    parser.add_argument("--out", default="bench/results/forgetting.json")
    args = parser.parse_args(argv)
    if args.as_avx2 and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        os.environ.update(AS_AVX2)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    from utils.core.profiles import read_settings
    from utils.core.seam import Use
    from utils.runtime.engine import Engine
    from utils.runtime.loading import load_model_pair
    from utils.task import forgetting

    pair = load_model_pair(replace(read_settings(), profile="smollm2-pricer", adapters=()), has_gpu=False)
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for key, value in result.items():
        print(f"{key}: {value:,.3f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
