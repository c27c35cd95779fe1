"""Load test: many concurrent /compare and /generate calls against a running app, loopback only.

Starts `python app.py` on 127.0.0.1 (the embedded default unless --profile says otherwise), takes every request's
serial result first, then fires them all at once from threads through gradio_client. It checks that every
request completes, none times out, each greedy result equals its serial result (no request ever sees another's
adapter state), and that the server's memory returns to its level before the load. Bounded in count and time.

    python bench/load_test.py [--requests 16] [--tokens 16] [--timeout 600] [--out bench/results/load.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTIONS = [
    "Budget plastic desk lamp, small, new",
    "Premium stainless steel espresso machine, 1.5 litre tank, milk frother",
    "Mid-range cotton bath towel set, large, 4 pieces",
    "Luxury leather office chair, adjustable, refurbished",
]
TASK = "How much does this cost to the nearest dollar?\n\n{}\n\nPrice is $"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 1e6


def wait_for_server(url: str, proc: subprocess.Popen, limit_s: float) -> None:
    import urllib.request

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the app exited with status {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(url + "/config", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"the app did not answer within {limit_s:.0f} s")


def make_jobs(n: int, tokens: int) -> list[dict]:
    """Alternating /compare and /generate (adapter on and off) over a few prompts."""
    jobs = []
    for i in range(n):
        prompt = TASK.format(DESCRIPTIONS[i % len(DESCRIPTIONS)])
        if i % 3 == 0:
            jobs.append({"api_name": "/compare", "args": {"prompt": prompt, "max_new_tokens": tokens}})
        else:
            jobs.append(
                {
                    "api_name": "/generate",
                    "args": {"prompt": prompt, "use_adapter": i % 3 == 1, "max_new_tokens": tokens},
                }
            )
    return jobs


def key(job: dict) -> str:
    return json.dumps(job, sort_keys=True)


def call(url: str, job: dict, timeout_s: float):
    from gradio_client import Client

    client = Client(url, verbose=False)
    started = time.perf_counter()
    job_handle = client.submit(api_name=job["api_name"], **job["args"])
    result = job_handle.result(timeout=timeout_s)
    return result, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--profile", default="smollm2-pricer")
    parser.add_argument("--out", default="bench/results/load.json")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 64:
        raise SystemExit("--requests must be between 1 and 64 (the test is bounded)")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LORA_LENS_PROFILE": args.profile, "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen(
        [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_server(url, server, 600)
        jobs = make_jobs(args.requests, args.tokens)
        serial = {}
        for job in jobs:  # distinct jobs once each, one at a time
            if key(job) not in serial:
                serial[key(job)] = call(url, job, args.timeout)[0]
        rss_before = rss_mb(server.pid)
        started = time.perf_counter()
        latencies, mismatches, failures = [], [], []
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            futures = {pool.submit(call, url, job, args.timeout): job for job in jobs}
            for future in as_completed(futures, timeout=args.timeout * 2):
                job = futures[future]
                try:
                    result, latency = future.result()
                except Exception as exc:  # a failure is a finding, not a crash of the test
                    failures.append(f"{job['api_name']}: {type(exc).__name__}: {exc}")
                    continue
                latencies.append(latency)
                if result != serial[key(job)]:
                    mismatches.append(job)
        wall = time.perf_counter() - started
        time.sleep(2)
        rss_after = rss_mb(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    report = {
        "requests": len(jobs),
        "completed": len(latencies),
        "failures": failures,
        "mismatches_with_serial": len(mismatches),
        "new_tokens_per_pane": args.tokens,
        "wall_s": wall,
        "throughput_req_per_s": len(latencies) / wall if wall else 0.0,
        "latency_p50_s": percentile(latencies, 50) if latencies else None,
        "latency_p90_s": percentile(latencies, 90) if latencies else None,
        "latency_max_s": max(latencies) if latencies else None,
        "latency_mean_s": statistics.mean(latencies) if latencies else None,
        "server_rss_before_mb": rss_before,
        "server_rss_after_mb": rss_after,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for name, value in report.items():
        print(f"{name:>28}: {value if not isinstance(value, float) else round(value, 3)}")
    grew = rss_after - rss_before
    ok = (
        not failures and not mismatches and len(latencies) == len(jobs) and grew < max(50.0, 0.1 * rss_before)
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
