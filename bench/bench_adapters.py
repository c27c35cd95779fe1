"""Several adapters on the embedded default: what a decode step costs with base + 3 adapters (4 rows) against
base + the fine-tune (2 rows), what each extra adapter costs in memory against its file, and the per-request
routing cost. All figures from one run, as ratios.

    python bench/bench_adapters.py [--tokens 48] [--repeats 3] [--out bench/results/adapters.json]

The demo's three checkpoints are stored in fp16 and peft widens them to fp32 as it loads them, so memory is
also measured against fp32 copies of the same checkpoints (written to --work-dir), where in-memory weights and
file hold the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # as app.py does, before torch loads

from bench.bench_engine import AS_AVX2, run_fields, step_ms  # noqa: E402


def decode_steps(engine, tokens: int, repeats: int) -> dict:
    """2 rows (base, final) against 4 rows (base + 3 adapters) and 4 rows of one adapter, interleaved."""
    from utils.core.seam import Row

    names = engine.adapter_names
    configs = {
        "2_rows_base_final": [Row("b", "", 0.0, None), Row("f", "", 1.0, names[0])],
        "4_rows_base_3_adapters": [Row("b", "", 0.0, None)] + [Row(n, "", 1.0, n) for n in names[1:4]],
        "4_rows_base_1_adapter": [Row("b", "", 0.0, None)]
        + [Row(f"s{s}", "", s, names[0]) for s in (0.5, 1, 1.5)],
    }
    samples = {key: [] for key in configs}
    for rows in configs.values():  # warm-up
        step_ms(engine, rows, 4)
    for _ in range(repeats):
        for key, rows in configs.items():
            samples[key].append(step_ms(engine, rows, tokens))
    med = {key: statistics.median(v) for key, v in samples.items()}
    return {
        **{f"step_ms_{key}": value for key, value in med.items()},
        "step_ratio_base_3_adapters_to_2_rows": med["4_rows_base_3_adapters"] / med["2_rows_base_final"],
        "step_ratio_base_1_adapter_4_rows_to_2_rows": med["4_rows_base_1_adapter"] / med["2_rows_base_final"],
    }


def routing_us(engine, n: int = 2000) -> dict:
    """Building, setting and clearing a request's plan: 2 rows on one adapter, 4 rows on 4 adapters."""
    router = engine.router

    def median_us(rows, adapters) -> float:
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            router.plan = router.plan_for(rows, adapters)
            router.plan = None
            samples.append(time.perf_counter() - started)
        return statistics.median(samples) * 1e6

    return {
        "routing_us_2_rows_1_adapter": median_us([0.0, 1.0], [None, 0]),
        "routing_us_4_rows_4_adapters": median_us([1.0, 1.0, 1.0, 1.0], [0, 1, 2, 3]),
        "routing_us_5_rows_base_4_adapters": median_us([0.0, 1.0, 1.0, 1.0, 1.0], [None, 0, 1, 2, 3]),
    }


MEMORY_PROBE = """
import gc, json, sys
sys.path.insert(0, {root!r})
from dataclasses import replace
from utils.core.profiles import read_settings
from utils.runtime.loading import load_model_pair
from utils.runtime.engine import Engine

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

extras = tuple(json.loads(sys.argv[1]))
pair = load_model_pair(replace(read_settings(), profile="smollm2-pricer", adapters=extras), has_gpu=False)
Engine(pair)  # the router stacks the adapters here
gc.collect()
storages = {{}}
for p in list(pair.model.parameters()) + list(pair.model.buffers()):
    storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
print(json.dumps({{"rss": rss(), "tensor_bytes": sum(storages.values()), "adapters": [a.as_dict() for a in pair.adapters]}}))
"""


def memory_per_adapter(work_dir: Path) -> dict:
    """Each extra adapter's cost in memory (resident tensors, and the process's RSS) against its file: with
    the demo's fp16 checkpoints, and with fp32 copies of them."""
    import torch
    from safetensors.torch import load_file, save_file

    from utils.core.profiles import DEMO_CHECKPOINTS_DIR

    root = str(Path(__file__).resolve().parent.parent)
    fp16 = sorted(DEMO_CHECKPOINTS_DIR.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    fp32 = []
    for folder in fp16:
        copy = work_dir / "fp32" / folder.name
        copy.mkdir(parents=True, exist_ok=True)
        tensors = {
            k: v.to(torch.float32) for k, v in load_file(str(folder / "adapter_model.safetensors")).items()
        }
        save_file(tensors, str(copy / "adapter_model.safetensors"), metadata={"format": "pt"})
        (copy / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
        fp32.append(copy)

    def probe(folders) -> dict:
        extras = json.dumps([[f"x{i}", str(f)] for i, f in enumerate(folders)])
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE.format(root=root), extras],
            capture_output=True, text=True, check=True, cwd=root,
        )  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    none = probe([])
    out = {}
    for label, folders in (("fp16_files", fp16), ("fp32_files", fp32)):
        loaded = probe(folders)
        files = sum(a["file_bytes"] for a in loaded["adapters"][1:])
        n = len(folders)
        out[f"extra_adapters_{label}"] = n
        out[f"file_mb_per_adapter_{label}"] = files / n / 1e6
        out[f"tensor_mb_per_adapter_{label}"] = (loaded["tensor_bytes"] - none["tensor_bytes"]) / n / 1e6
        out[f"rss_mb_per_adapter_{label}"] = (loaded["rss"] - none["rss"]) / n / 1e6
        out[f"tensor_over_file_{label}"] = (loaded["tensor_bytes"] - none["tensor_bytes"]) / files
        out[f"rss_over_file_{label}"] = (loaded["rss"] - none["rss"]) / files
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", default="/tmp/lora-lens-bench")
    parser.add_argument("--out", default="bench/results/adapters.json")
    parser.add_argument("--as-avx2", action="store_true", help="as bench_engine.py's --as-avx2")
    args = parser.parse_args(argv)
    if args.as_avx2 and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        os.environ.update(AS_AVX2)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    from utils.core.profiles import read_settings
    from utils.runtime.engine import Engine
    from utils.runtime.loading import load_model_pair

    pair = load_model_pair(replace(read_settings(), profile="smollm2-pricer"), has_gpu=False)
    engine = Engine(pair)
    if len(engine.adapter_names) < 4:
        raise SystemExit(
            f"needs the demo's final adapter and its three checkpoints; loaded {engine.adapter_names}"
        )
    result = {
        **run_fields(pair, args.as_avx2),
        "adapters": engine.adapter_names,
        **decode_steps(engine, args.tokens, args.repeats),
        **routing_us(engine),
    }
    del engine, pair
    result.update(memory_per_adapter(Path(args.work_dir)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for key, value in result.items():
        print(f"{key}: {value:,.3f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
