"""The project's fused 4-bit CPU kernel (csrc/), registered for bitsandbytes' own op.

bitsandbytes computes a 4-bit linear layer on most CPUs by de-quantizing the whole weight to fp32 and then
multiplying (`bitsandbytes::gemm_4bit`'s default kernel), every decode step. csrc/nf4_gemm.cpp decodes the
weights in registers instead and multiplies them into the few rows of a decode step at once, so the weights
stay 4-bit in memory and are read once per step; for many rows (a prefill, a teacher-forced pass) it
de-quantizes one tile of 64 outputs at a time into cache and multiplies it into all rows by BLAS. It is
compiled from the project's source with the machine's C++ compiler (utils/runtime/kernel_build.py; at install
time, `python -m utils.runtime.nf4_kernel --build`; again at load if missing) into the cache folder, and
registered as the CPU kernel of `bitsandbytes::gemm_4bit`. Wherever it cannot be built or the CPU lacks
AVX2/FMA, or for inputs it does not cover (not fp32, a block size it does not divide), the stock bitsandbytes
path runs, unchanged. CUDA is never touched: only the CPU key.

Where the CPU has AVX-512 (F and BW) and torch runs its own AVX-512 kernels, csrc/nf4_gemm_avx512.cpp runs
instead of the AVX2 loops: the same products with a 16-wide code-book lookup.

`LORA_LENS_CPU_KERNEL`: auto (default) runs the fastest path that is exact to float32 rounding, as a short
probe at the first load measures it on this CPU (utils/runtime/kernel_probe.py, cached per CPU and versions);
fused always takes this kernel at the widest vector width; off leaves bitsandbytes' own path (on CPUs with
AVX512-BF16 its fused kernel, which computes in bf16 whatever the compute dtype says).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from utils.runtime.kernel_build import build, library_path

# Up to this many rows (a decode step) the weights are decoded in registers for all rows at once; more (a prefill,
# a teacher-forced pass) take the kernel's tiled path: a tile de-quantized into cache, multiplied by BLAS.
MAX_FUSED_ROWS = 16


@dataclass
class KernelState:
    """What the registered kernel does now; `enabled` switches between it and the stock path (benchmarks)."""

    registered: bool = False
    enabled: bool = False
    takes_over: bool = False  # this kernel serves the CPUs where bitsandbytes has its own (AVX512-BF16) too
    status: str = "not loaded"  # shown in the header: which path runs and, if stock, why
    vector_bits: int = 256  # 512 where the AVX-512 kernels run
    probe: object = None  # the kernel_probe.ProbeResult that decided `auto`, where one ran


STATE = KernelState()


def cpu_has_avx2_fma() -> bool:
    """True where the CPU has AVX2 and FMA (read from /proc/cpuinfo; False where it cannot be read)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    words = set(flags.split())
    return {"avx2", "fma"} <= words


def bitsandbytes_has_own_kernel() -> bool:
    """True where bitsandbytes runs its fused AVX512-BF16 CPU kernel (it repacks the weights for it)."""
    try:
        from bitsandbytes.functional import has_avx512bf16

        return bool(has_avx512bf16())
    except Exception:  # an older bitsandbytes or a failed probe: its own kernel is not there
        return False


def enable(cache_dir: Path) -> str:
    """Load (building if needed) and register the kernel; returns the status line. Never raises: any failure
    leaves bitsandbytes' stock path in place and says why."""
    mode = requested_mode()
    if STATE.registered:
        STATE.enabled = mode != "off"
        STATE.takes_over = _takes_over(mode, cache_dir)
        STATE.status = _serving_status() if mode != "off" else "stock bitsandbytes (LORA_LENS_CPU_KERNEL=off)"
        return STATE.status
    if mode == "off":
        STATE.status = "stock bitsandbytes (LORA_LENS_CPU_KERNEL=off)"
        return STATE.status
    if not cpu_has_avx2_fma():
        STATE.status = "stock bitsandbytes (this CPU has no AVX2/FMA)"
        return STATE.status
    try:
        import torch

        torch.ops.load_library(str(build(cache_dir)))
        torch.library.register_kernel("bitsandbytes::gemm_4bit", "cpu", _gemm_4bit_cpu)
    except Exception as exc:  # a failed build must never stop the app: the stock path still works
        STATE.status = f"stock bitsandbytes (the fused kernel could not be built: {exc})"
        return STATE.status
    STATE.registered = STATE.enabled = True
    STATE.takes_over = _takes_over(mode, cache_dir)
    STATE.status = _serving_status()
    return STATE.status


def runs_avx512() -> bool:
    """The AVX-512 kernels run where the CPU has AVX-512 F and BW and torch is not held to AVX2
    (ATEN_CPU_CAPABILITY, as bench/bench_engine.py --as-avx2 sets it)."""
    import torch

    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return {"avx512f", "avx512bw"} <= flags and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _takes_over(mode: str, cache_dir: Path) -> bool:
    """Does this kernel serve the CPUs where bitsandbytes has its own (and with which vector width)? fused: yes,
    at the widest width the CPU and torch run; auto: as the probe found fastest among the exact paths
    (kernel_probe.py); off: no."""
    import torch

    from utils.runtime import kernel_probe

    STATE.probe = None
    widest = 512 if runs_avx512() else 256
    STATE.vector_bits = int(torch.ops.lora_lens.set_vector_width(widest))
    if mode == "fused":
        return True
    if mode != "auto":
        return False
    from utils.runtime.threads import usable_cores

    STATE.probe = kernel_probe.choose(
        cache_dir,
        library_path(cache_dir),
        max(1, min(2, usable_cores())),
        avx512=widest == 512,
        own_bf16=bitsandbytes_has_own_kernel(),
    )
    if STATE.probe.choice == kernel_probe.STOCK:
        STATE.enabled = False  # de-quantize-then-matmul in float32 measured fastest (or the kernel was wrong)
        return False
    STATE.vector_bits = int(
        torch.ops.lora_lens.set_vector_width(512 if STATE.probe.choice == kernel_probe.AVX512 else 256)
    )
    return True


def bitsandbytes_kernel_serves() -> bool:
    """True where bitsandbytes' own AVX512-BF16 kernel serves the CPU's 4-bit layers (computing in bf16): with
    LORA_LENS_CPU_KERNEL=off, or where this kernel is not built."""
    return (
        bitsandbytes_has_own_kernel()
        and not (STATE.enabled and STATE.takes_over)
        and (requested_mode() == "off" or not STATE.registered)
    )


MODE_VARIABLE = "LORA_LENS_CPU_KERNEL"
MODES = ("auto", "fused", "off")


def _given_mode() -> str:
    return os.environ.get(MODE_VARIABLE, "auto").strip().lower()


def requested_mode() -> str:
    """LORA_LENS_CPU_KERNEL: auto (this kernel where bitsandbytes has none), fused (everywhere), off; any
    other value counts as auto, and the status line says so."""
    mode = _given_mode()
    return mode if mode in MODES else "auto"


@contextmanager
def mode(name: str, cache_dir: Path) -> Iterator[KernelState]:
    """Models loaded inside use LORA_LENS_CPU_KERNEL=name (benchmarks and tests compare kernels in one
    process); afterwards the process's own mode is back."""
    previous = os.environ.get(MODE_VARIABLE)
    os.environ[MODE_VARIABLE] = name
    try:
        enable(cache_dir)
        yield STATE
    finally:
        if previous is None:
            os.environ.pop(MODE_VARIABLE, None)
        else:
            os.environ[MODE_VARIABLE] = previous
        enable(cache_dir)


def _serving_status() -> str:
    if not STATE.enabled:  # the probe found bitsandbytes' float32 path fastest, or this kernel wrong
        status = "stock bitsandbytes, float32 (de-quantize, then matmul)"
    elif bitsandbytes_has_own_kernel() and not STATE.takes_over:
        status = "bitsandbytes' fused AVX512-BF16 kernel (bf16 inside the 4-bit matmuls)"
    else:
        width = "AVX-512" if STATE.vector_bits == 512 else "AVX2"
        status = f"fused 4-bit kernel ({width}, float32, csrc/nf4_gemm.cpp)"
    if STATE.probe is not None:
        status += f": {STATE.probe.reason}"
    elif bitsandbytes_has_own_kernel() and STATE.takes_over:
        status += ", as LORA_LENS_CPU_KERNEL=fused asks"
    given = _given_mode()
    if given not in MODES:
        status += f"; LORA_LENS_CPU_KERNEL={given[:20]!r} is not one of {', '.join(MODES)}: auto"
    return status


def set_thread_count(threads: int) -> int | None:
    """The calling thread's CPU threads for torch's loops, MKL and the kernels, leaving torch's process-wide
    default (which threads started later take) as it is; returns the thread's previous count, or None where the
    library is not loaded."""
    if not STATE.registered:
        return None
    import torch

    return int(torch.ops.lora_lens.set_thread_count(threads))


def prepare(model) -> None:
    """Before a CPU model's first forward pass, where this kernel serves the model: keep bitsandbytes from
    repacking the weights for its AVX512-BF16 kernel (in `fused` mode), and call the kernel straight from each
    4-bit layer (`direct_forward`)."""
    if not STATE.registered or bitsandbytes_kernel_serves():
        return
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            direct_forward(module)


def direct_forward(layer) -> None:
    """A 4-bit layer's forward that calls the kernel itself (for a decode step's rows and a prefill's): the same
    product as bitsandbytes' forward -> matmul_4bit -> gemm_4bit -> this kernel, without the three Python
    layers between, which a decode step pays in each of its 210 4-bit layers. Anything else takes the layer's
    own forward (training, other dtypes, the kernel switched off).

    The layer also gets `lora_lens_with_update(x, lora_a, lora_b_t, factors, spans)`: the same product plus a
    LoRA update per row from its block of the stacked adapters (lora_b_t: lora_B transposed, [rank, out]),
    `result + (lora_b_t[span].T @ (lora_a[span] @
    x)) * factors[row]`, in one kernel call (the engine's strength router uses it), or None where the kernel
    does not serve this input.
    """
    import torch

    plain = layer.forward
    cached: dict = {}
    params = layer._parameters  # weight and bias, read without Module.__getattr__ (210 layers a step)

    def kernel_args(x, max_rows=None):
        weight = params["weight"]
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (
            not STATE.enabled
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or torch.is_grad_enabled()
            or layer.compute_dtype not in (None, torch.float32)
            or rows == 0
            or (max_rows is not None and rows > max_rows)
        ):
            return None
        if cached.get("weight") is not weight:
            cached.clear()
            cached.update(weight=weight, args=kernel_args_for(weight))
        return cached["args"]

    def forward(x):
        args = kernel_args(x)
        if args is None:
            return plain(x)
        return torch.ops.lora_lens.nf4_gemm(x, *args, params["bias"])

    def with_update(x, lora_a, lora_b_t, factors, spans):
        # decode rows only: for a prefill's many rows peft's two matmuls compute A x faster than the kernel's
        # row-by-row dot products
        args = kernel_args(x, MAX_FUSED_ROWS)
        if args is None or lora_a.dtype != torch.float32 or lora_b_t.dtype != torch.float32:
            return None
        return torch.ops.lora_lens.nf4_lora_gemm(x, *args, params["bias"], lora_a, lora_b_t, factors, spans)

    layer.forward = forward
    layer.lora_lens_with_update = with_update


def kernel_args_for(weight):
    """The kernel's arguments after the activations for a 4-bit weight: (packed weight, N, K, absmax, blocksize,
    code book, nested absmax8, nested code, nested offset); None where the kernel does not apply (as
    `_gemm_4bit_cpu`)."""
    state = getattr(weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False) or len(state.shape) != 2:
        return None
    n, k = state.shape
    if not _covers(k, state.blocksize):
        return None
    if state.nested:
        if state.state2.blocksize != 256:
            return None
        scales = (state.state2.absmax, state.absmax, state.state2.code, state.offset)
    else:
        scales = (state.absmax, None, None, None)
    return (weight.data, n, k, scales[0], state.blocksize, _code(state.quant_type), *scales[1:])


def _covers(k: int, blocksize: int) -> bool:
    """The kernel decodes 32 weights at a time within one scale block."""
    return k % blocksize == 0 and blocksize % 32 == 0


def _stock(*args, **kwargs):
    from bitsandbytes.backends.default.ops import _gemm_4bit_default_impl

    return _gemm_4bit_default_impl(*args, **kwargs)


_CODES: dict = {}


def _code(quant_type: str):
    if quant_type not in _CODES:
        from bitsandbytes.functional import get_4bit_type

        _CODES[quant_type] = get_4bit_type(quant_type, device="cpu").float().contiguous()
    return _CODES[quant_type]


def _gemm_4bit_cpu(
    A,
    B,
    shapeB,
    absmax,
    blocksize,
    quant_type,
    bias=None,
    absmax_8bit=None,
    absmax_code=None,
    absmax_offset=None,
):
    """bitsandbytes::gemm_4bit on the CPU: the fused kernel where it applies, else the stock computation."""
    import torch

    n, k = shapeB
    rows = A.numel() // k if k else 0
    fused = (
        STATE.enabled
        and A.dtype == torch.float32
        and rows > 0
        and _covers(k, blocksize)
        and (absmax_8bit is None or (absmax_code is not None and absmax_offset is not None))
    )
    if not fused:
        return _stock(
            A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset
        )
    return torch.ops.lora_lens.nf4_gemm(
        A, B, n, k, absmax, blocksize, _code(quant_type), absmax_8bit, absmax_code, absmax_offset, bias
    )


def main(argv=None) -> int:
    """`python -m utils.runtime.nf4_kernel --build`: build into the cache; says what happened and never fails the
    install (the stock path is the fallback)."""
    from utils.core.profiles import read_settings

    cache_dir = read_settings().cache_dir
    if not cpu_has_avx2_fma():
        print("nf4 kernel: this CPU has no AVX2/FMA; bitsandbytes' stock path will run.")
        return 0
    try:
        path = build(cache_dir)
    except Exception as exc:
        print(f"nf4 kernel: not built ({exc}); bitsandbytes' stock path will run.")
        return 0
    print(f"nf4 kernel: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
