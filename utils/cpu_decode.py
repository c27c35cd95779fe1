"""The output layer (lm_head) of a CPU decode step, computed as `W @ x^T` instead of `x @ W^T`.

A decode step multiplies a few rows (one per pane) by the output layer: for SmolLM2, 49,152 x 576 floats
(113 MB in fp32, the embeddings tied to it), more bytes than all the 4-bit layers together. For 2 to 8 rows,
torch's CPU `linear` repacks that whole matrix on every call (measured on an AVX512 EPYC, 1 thread: 13.7 ms
for 2 rows, 21 ms for 3, against 6.9 ms for 1), while the same product with the weight as the left operand
streams it once (4.5 ms for 2 rows, 2.4 ms with 2 threads): bench/bench_engine.py measures both. A single row
is computed as two (the row twice), which costs less than the single-row kernel. Only the order of the sums
differs from `linear` (about 1e-7 relative); prefill (many rows), other dtypes and autograd keep `linear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_ROWS = 8  # measured: from about 12 rows on, `linear` is as fast or faster


@dataclass
class OutputLayerSwitch:
    """Benchmarks and tests compare the two paths in one process by flipping `enabled`."""

    enabled: bool = True


SWITCH = OutputLayerSwitch()


def output_layer_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for the few rows of a decode step, with the weight streamed once."""
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
