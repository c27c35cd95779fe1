"""Which 4-bit CPU path `LORA_LENS_CPU_KERNEL=auto` runs, decided by timing the candidates on this CPU once.

Before the first model loads, a short probe multiplies one NF4 weight into the two rows of a two-pane decode
step with each path this CPU has: the project's kernel with its AVX-512 loops (csrc/nf4_gemm_avx512.cpp) and
with its AVX2 loops, bitsandbytes' stock de-quantize-then-matmul, and, on CPUs with AVX512-BF16, bitsandbytes'
own fused kernel. Each result is checked against the de-quantized weight multiplied in float32. The fastest path
that matches it to float32 rounding runs. bitsandbytes' AVX512-BF16 kernel rounds the activations to bf16 inside
(whatever the compute dtype says): it is timed and shown, but `auto` never picks it, since its numbers differ
from every other CPU's and from the weights' own (`LORA_LENS_CPU_KERNEL=off` runs it). The result is cached in
the cache folder, keyed by the CPU's model and flags, the torch and bitsandbytes versions and the kernel's
build, so later loads read it instead of timing again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

PROBE_SHAPE = (2048, 2048)  # out x in features: 2 MB in 4 bits, beyond the L2 cache of the CPUs measured
PROBE_ROWS = 2  # a two-pane decode step
REPEATS = 5  # best of: timing noise on a busy machine only ever adds time
CALLS = 10  # products per timed repeat
FUSED, BITSANDBYTES = "fused", "bitsandbytes"


AVX512, AVX2, STOCK, OWN_BF16 = "fused AVX-512", "fused AVX2", "stock float32", "bitsandbytes AVX512-BF16"
EXACT = (AVX512, AVX2, STOCK)  # the float32 paths, in the order preferred on a tie
TOLERANCE = 1e-5  # x the largest value: float32 rounding of a 2048-term sum, with room


@dataclass(frozen=True)
class ProbeResult:
    """Milliseconds per 2-row product for each path that ran (None: it failed its check), and the choice."""

    choice: str
    times_ms: dict = field(default_factory=dict)
    cached: bool = False

    @property
    def reason(self) -> str:
        """Why `choice` was made, for the header: every path's time, and which were not eligible."""
        where = "cached load-time probe" if self.cached else "load-time probe"
        shown = []
        for name, ms in self.times_ms.items():
            if ms is None:
                shown.append(f"{name} wrong")
            else:
                shown.append(f"{name} {ms:.3f}" + (" (bf16, not exact)" if name == OWN_BF16 else ""))
        return f"fastest exact path in the {where}, ms per 2-row product: " + ", ".join(shown)


def cpu_key() -> str:
    """The CPU's model name and flags, as /proc/cpuinfo gives them ("" where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(lines))  # each line once: every core repeats them


def cache_path(cache_dir: Path, library: Path) -> Path:
    import bitsandbytes
    import torch

    # torch's own vector width too: ATEN_CPU_CAPABILITY=avx2 rules the AVX-512 loops out (runs_avx512)
    parts = [cpu_key(), torch.__version__, torch.backends.cpu.get_cpu_capability(), bitsandbytes.__version__]
    parts.append(library.name)
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return Path(cache_dir) / "kernels" / f"probe-{key}.json"


def choose(cache_dir: Path, library: Path, threads: int, avx512: bool, own_bf16: bool) -> ProbeResult:
    """The cached choice for this CPU and these versions, else a fresh probe (written to the cache)."""
    path = cache_path(cache_dir, library)
    try:
        known = json.loads(path.read_text())
        return ProbeResult(known["choice"], dict(known["times_ms"]), cached=True)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    result = probe(threads, avx512, own_bf16)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"choice": result.choice, "times_ms": result.times_ms}))
        os.replace(partial, path)
    except OSError:  # a read-only cache: probe again next time
        pass
    return result


def decide(times_ms: dict) -> str:
    """The fastest exact path that ran and passed its check (the stock path where none did)."""
    exact = [
        (times_ms[name], order, name) for order, name in enumerate(EXACT) if times_ms.get(name) is not None
    ]
    return min(exact)[2] if exact else STOCK


def probe(threads: int, avx512: bool, own_bf16: bool) -> ProbeResult:
    """Time each path on one NF4 weight with PROBE_ROWS rows (the project's kernel must be loaded), in a thread
    of its own: the OpenMP team its `threads` start ends with it (utils/runtime/threads.py: torch_threads says
    what a team left alive in the loading thread would cost every decode step)."""
    from utils.runtime.threads import in_own_thread

    return in_own_thread(threads, lambda: _probe(avx512, own_bf16))


def _probe(avx512: bool, own_bf16: bool) -> ProbeResult:
    import torch

    from utils.runtime import nf4_kernel

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*PROBE_SHAPE, generator=generator)
    x = torch.randn(PROBE_ROWS, PROBE_SHAPE[1], generator=generator)
    width = nf4_kernel.STATE.vector_bits
    times: dict = {}
    try:
        with torch.inference_mode():
            layer, reference = _layer(weight, torch.float32, own_kernel=False)
            expected = x @ reference.T
            args = nf4_kernel.kernel_args_for(layer.weight)
            fused = lambda: torch.ops.lora_lens.nf4_gemm(x, *args, None)  # noqa: E731
            for name, bits in ((AVX512, 512), (AVX2, 256)):
                if bits == 512 and not avx512:
                    continue
                torch.ops.lora_lens.set_vector_width(bits)
                times[name] = _timed(fused, expected, TOLERANCE)
            state = layer.weight.quant_state
            stock_args = (layer.weight.data, state.shape, state.state2.absmax, state.blocksize, "nf4")
            stock_kwargs = dict(
                absmax_8bit=state.absmax, absmax_code=state.state2.code, absmax_offset=state.offset
            )
            stock = lambda: nf4_kernel._stock(x, *stock_args, **stock_kwargs)  # noqa: E731
            times[STOCK] = _timed(stock, expected, TOLERANCE)
            if own_bf16:
                own, _ = _layer(weight, torch.bfloat16, own_kernel=True)
                x16 = x.bfloat16()
                times[OWN_BF16] = _timed(lambda: own(x16), expected, 2.0**-6)
    finally:
        torch.ops.lora_lens.set_vector_width(width)
    return ProbeResult(decide(times), times)


def _layer(weight, compute_dtype, own_kernel: bool):
    """(a bitsandbytes NF4 layer of `weight`, its de-quantized float32 weight)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch

    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=compute_dtype)
    layer.weight = bnb.nn.Params4bit(
        weight.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    layer = layer.to("cpu").eval()
    layer.support_avx512bf16_for_cpu = own_kernel
    dequantized = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.float32)
    return layer, dequantized


def _timed(product, expected, tolerance: float) -> float | None:
    """Best milliseconds per call, or None where the result is off by more than `tolerance` x its largest value
    (or the call fails)."""
    import torch

    try:
        got = product().to(torch.float32)  # the first call also repacks, for bitsandbytes' own kernel
        if not bool(((got - expected).abs().max() <= tolerance * expected.abs().max()).item()):
            return None
        best = float("inf")
        for _ in range(REPEATS):
            started = time.perf_counter()
            for _ in range(CALLS):
                product()
            best = min(best, (time.perf_counter() - started) / CALLS)
    except (RuntimeError, ValueError, TypeError):
        return None
    return best * 1000
