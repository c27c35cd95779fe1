"""LoRA Lens's CPU decode against llama.cpp on the same machine in the same run: llama.cpp's
llama-batched-bench on the embedded Q4_1 GGUF, without and with the demo adapter as a GGUF LoRA (this project's
export, equal to llama.cpp's own converter's), at 1, 2 and 5 sequences and 1 and 2 threads; LoRA Lens on the
embedded default (NF4, the adapter routed per row) at 1, 2 and 5 rows; tokens a second per sequence, and the
ratio LoRA Lens / llama.cpp with the LoRA applied at the same thread count. With --as-avx2 both sides are held to
AVX2: LoRA Lens's AVX2 loops and llama.cpp's portable AVX2 build.

The comparison with the LoRA runs in rounds: in each, llama.cpp and then LoRA Lens at one thread count, back to
back, so that a slow spell of the machine (some hold both engines back by a third for seconds at a time) falls on
both sides of a ratio; the figures are the medians over the rounds, each round's ratios kept beside them.

    python bench/bench_llama_cpp.py [--tokens 64] [--rounds 3] [--as-avx2] [--out bench/results/llama_cpp.json]

llama.cpp comes from scripts/build_llama_cpp.sh (built once, cached).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # as app.py does, before torch loads

from bench.bench_engine import embedded_pair, parse_bench_args, run_fields, step_ms, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SEQUENCES = (1, 2, 5)
PROMPT_TOKENS = 64  # llama-batched-bench's prompt per sequence, about a pricer prompt's length


def llama_cpp_dir(avx2_only: bool) -> Path:
    """llama.cpp built for this CPU (GGML_NATIVE), or with `avx2_only` its portable AVX2 build: what an AVX2-only
    CPU runs, beside LoRA Lens's AVX2 loops in an --as-avx2 run."""
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_llama_cpp.sh")],
        env={**os.environ, "PYTHON": sys.executable, "LLAMA_CPP_AVX2_ONLY": "1" if avx2_only else "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(done.stdout.strip().splitlines()[-1].split(": ", 1)[1])


def batched_bench(tools: Path, model: Path, lora: Path | None, threads: int, tokens: int) -> dict[int, float]:
    """{sequences: decode tokens a second per sequence} from llama-batched-bench's table (S_TG t/s / B)."""
    command = [
        str(tools / "bin" / "llama-batched-bench"), "-m", str(model), "-c", "4096", "-b", "512",
        "-npp", str(PROMPT_TOKENS), "-ntg", str(tokens), "-npl", ",".join(map(str, SEQUENCES)),
        "-t", str(threads), "-tb", str(threads),
    ]  # fmt: skip
    if lora is not None:
        command += ["--lora", str(lora)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=True)
    rates = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and re.fullmatch(r"\d+", cells[0] or "x"):
            batch, tg_rate = int(cells[2]), float(cells[7])
            rates[batch] = tg_rate / batch
    if set(rates) != set(SEQUENCES):
        raise RuntimeError(
            f"llama-batched-bench printed no table:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    return rates


def median_rates(samples: list[dict[int, float]]) -> dict[int, float]:
    """{sequences: the median over the samples}."""
    return {n: statistics.median(sample[n] for sample in samples) for n in SEQUENCES}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=3, help="llama.cpp and LoRA Lens back to back, this often"
    )
    args = parse_bench_args(parser, argv, "bench/results/llama_cpp.json")
    from utils.core.seam import Row
    from utils.runtime.embedded import gguf_path
    from utils.runtime.engine import Engine
    from utils.runtime.exports import write_gguf_lora

    tools = llama_cpp_dir(args.as_avx2)
    pair = embedded_pair()
    engine = Engine(pair)
    rows = {
        1: [Row("s0", "fine-tuned", 1.0)],
        2: engine.rows_for("both"),
        5: [Row(f"s{i}", f"s = {s}", s) for i, s in enumerate((0.0, 0.5, 1.0, 1.5, 2.0))],
    }
    step_ms(engine, rows[2], 4)  # warm-up
    default_threads = engine.threads

    def lora_lens_rates(threads: int) -> dict[int, float]:
        engine.threads = threads  # the engine's own threads, as LORA_LENS_CPU_THREADS sets them
        try:
            return {n: 1000.0 / step_ms(engine, rows[n], args.tokens) for n in SEQUENCES}
        finally:
            engine.threads = default_threads

    base = {t: batched_bench(tools, gguf_path(), None, t, args.tokens) for t in (1, 2)}
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        lora = write_gguf_lora(pair.adapter_dir, pair.model.config.to_dict(), Path(tmp) / "lora.gguf")
        for _ in range(max(1, args.rounds)):
            measured = {}
            for threads in (1, 2):
                measured[f"llama_cpp_lora_{threads}t"] = batched_bench(
                    tools, gguf_path(), lora, threads, args.tokens
                )
                measured[f"lora_lens_{threads}t"] = lora_lens_rates(threads)
            rounds.append(measured)
    median = {key: median_rates([r[key] for r in rounds]) for key in rounds[0]}
    round_ratios = {  # per thread count, each round's LoRA Lens / llama.cpp with the LoRA
        t: [{n: r[f"lora_lens_{t}t"][n] / r[f"llama_cpp_lora_{t}t"][n] for n in SEQUENCES} for r in rounds]
        for t in (1, 2)
    }
    result = {
        **run_fields(pair, args.as_avx2),
        "decode_tokens": args.tokens,
        "llama_cpp_prompt_tokens": PROMPT_TOKENS,
        "llama_cpp_build": "portable AVX2 (GGML_NATIVE=OFF)" if args.as_avx2 else "native (GGML_NATIVE=ON)",
        "lora_lens_default_threads": default_threads,
        "rounds": len(rounds),
        **{f"lora_lens_{t}t_tokens_per_s_per_sequence": median[f"lora_lens_{t}t"] for t in (1, 2)},
        **{f"llama_cpp_base_{t}t_tokens_per_s_per_sequence": base[t] for t in (1, 2)},
        **{f"llama_cpp_lora_{t}t_tokens_per_s_per_sequence": median[f"llama_cpp_lora_{t}t"] for t in (1, 2)},
        **{f"ratio_lora_lens_over_llama_cpp_lora_{t}t": median_rates(round_ratios[t]) for t in (1, 2)},
        "rounds_measured": rounds,
        **{f"round_ratios_{t}t": round_ratios[t] for t in (1, 2)},
    }
    write_result(args.out, result)
    print(
        json.dumps({key: value for key, value in result.items() if key.startswith(("ratio", "round_ratios"))})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
