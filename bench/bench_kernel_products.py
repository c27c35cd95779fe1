"""The project's 4-bit kernel alone: microseconds for a large NF4 product pair at 1, 2 and 5 rows, for one of its
vector widths. Made to compare two builds of the kernel: run it from each checkout in turns (each builds and
loads its own csrc/), so machine drift hits both alike.

    python bench/bench_kernel_products.py [--width 256|512] [--rounds 5] [--repeats 50]

The weights are a 16384 x 576 and a 576 x 16384 NF4 matrix with nested scales (random, blocksize 64), about the
4-bit bytes of a quarter of the embedded default's layers, so the figure is the kernel's and not a call's setup.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # as app.py does, before torch loads

SHAPES = ((16384, 576), (576, 16384))
ROW_COUNTS = (1, 2, 5)


def quantized(n: int, k: int, seed: int):
    """bitsandbytes::gemm_4bit's arguments for a random NF4 weight [n, k] with nested scales."""
    import bitsandbytes.functional as F
    import torch

    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    args = (packed, state.shape, state.state2.absmax, state.blocksize, "nf4")
    kwargs = dict(absmax_8bit=state.absmax, absmax_code=state.state2.code, absmax_offset=state.offset)
    return args, kwargs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--width", type=int, choices=[256, 512], default=256, help="the kernel's vector width"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    from utils.core.profiles import read_settings
    from utils.runtime import nf4_kernel

    status = nf4_kernel.enable(Path(read_settings().cache_dir))
    if not nf4_kernel.STATE.registered:
        print(f"the kernel is not available: {status}")
        return 1
    if args.width == 512 and not nf4_kernel.runs_avx512():
        print("this CPU (or torch's setting) does not run the AVX-512 loops")
        return 1
    torch.set_num_threads(args.threads)
    torch.ops.lora_lens.set_thread_count(args.threads)
    torch.ops.lora_lens.set_vector_width(args.width)
    weights = [quantized(n, k, seed) for seed, (n, k) in enumerate(SHAPES)]
    best = {}
    for rows in ROW_COUNTS:
        inputs = [torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) for _, k in SHAPES]
        times = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            for _ in range(args.repeats):
                for (w_args, w_kwargs), a in zip(weights, inputs, strict=True):
                    torch.ops.bitsandbytes.gemm_4bit.default(a, *w_args, **w_kwargs)
            times.append((time.perf_counter() - started) / args.repeats * 1e6)
        best[rows] = min(times)
    figures = " / ".join(f"{best[rows]:,.0f}" for rows in ROW_COUNTS)
    print(
        f"{Path(__file__).resolve().parent.parent}: width {args.width}, {args.threads} threads, µs for the pair, "
        f"{' / '.join(map(str, ROW_COUNTS))} rows (best of {args.rounds} rounds of {args.repeats}): {figures}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
