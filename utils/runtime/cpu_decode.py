"""The output layer (lm_head) of a CPU decode step, computed with the weight streamed once.

A decode step multiplies a few rows (one per pane) by the output layer: for SmolLM2, 49,152 x 576 floats
(113 MB in fp32, the embeddings tied to it), more bytes than all the 4-bit layers together. For 2 to 8 rows,
torch's CPU `linear` repacks that whole matrix on every call (measured on an AVX512 EPYC, 1 thread: 13.7 ms
for 2 rows, 21 ms for 3, against 6.9 ms for 1). Where the project's compiled kernels are loaded
(utils/runtime/nf4_kernel.py), `lora_lens::dense_rows_gemm` reads each row of the weight once for all rows of the
step, at about the core's read bandwidth (3.1 ms for 2 rows on that machine with torch limited to AVX2); else
`W @ x^T` streams it once too, at about half that bandwidth (4.4 ms; a single row as two, which costs less
than torch's single-row kernel). bench/bench_engine.py measures the paths. Only the order of the sums differs
from `linear` (about 1e-7 relative); prefill (many rows), other dtypes and autograd keep `linear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.runtime import nf4_kernel

MAX_ROWS = 8  # measured: from about 12 rows on, `linear` is as fast or faster


@dataclass
class OutputLayerSwitch:
    """Benchmarks and tests compare the two paths in one process by flipping `enabled`."""

    enabled: bool = True
    compiled: bool = True  # the compiled kernel where it is loaded, else `W @ x^T`


SWITCH = OutputLayerSwitch()


def output_layer_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for the few rows of a decode step, with the weight streamed once."""
    if SWITCH.compiled and nf4_kernel.STATE.enabled and x.numel() // x.shape[-1] <= MAX_ROWS:
        return torch.ops.lora_lens.dense_rows_gemm(x, weight, bias)
    features = x.shape[-1]
    rows = x.reshape(-1, features)
    if rows.shape[0] == 1:
        rows = rows.repeat(2, 1)  # two rows take the streaming kernel; one takes the slower gemv
        out = (weight @ rows.T).T[:1]
    else:
        out = (weight @ rows.T).T
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def speed_up_output_layer(model) -> bool:
    """Route the model's fp32 output layer through `output_layer_product` for decode steps; True if done."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.weight.dtype != torch.float32:
        return False
    if getattr(head, "_lora_lens_decode_path", False):
        return True
    plain_forward = head.forward

    def forward(x):
        if (
            not SWITCH.enabled
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or torch.is_grad_enabled()
            or x.numel() // x.shape[-1] > MAX_ROWS
        ):
            return plain_forward(x)
        return output_layer_product(x, head.weight, head.bias)

    head.forward = forward
    head._lora_lens_decode_path = True
    return True
