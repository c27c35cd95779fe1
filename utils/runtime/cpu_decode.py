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

Where every weight of the output layer is exactly an int8 times one float scale per 32 consecutive weights (the
embedded default's embedding is a GGUF Q8_0 tensor, de-quantized to float32 when the cache was made), that form
is found at load (`exact_int8_form`, checked value by value) and `lora_lens::q8_rows_gemm` streams it: 30 MB
instead of 113 MB a step, each weight rebuilt to the same float32 value before it is multiplied. A weight that
is not exactly of that form keeps the float32 path; the float32 weight itself stays (the embedding lookup and
prefill read it).
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
    int8: bool = True  # the exact int8 form where the weight has one


SWITCH = OutputLayerSwitch()


def exact_int8_form(weight: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 [N, K], float32 scales [N, K / block]) with q * scale == weight for every value, exactly; None where
    the float32 weight has no such form. A Q8_0 block's scale is its largest |value| / 127 (the quantizer puts
    +-127 at the largest), so it is recovered exactly from the de-quantized values."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[1] % block:
        return None
    n, k = weight.shape
    blocks = weight.detach().reshape(n, k // block, block)
    scales = blocks.abs().amax(-1) / 127
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(blocks / safe.unsqueeze(-1))
    if q.abs().max() > 127 or not torch.equal(q * scales.unsqueeze(-1), blocks):
        return None
    return q.to(torch.int8).reshape(n, k).contiguous(), scales.contiguous()


def compiled_product(weight: torch.Tensor, bias, rows: int, int8_form=None) -> tuple | None:
    """The compiled product that serves the output layer for `rows` rows now: (int8, scales, None, bias) where
    its exact int8 form is given and used, else (None, None, weight, bias); None where neither serves."""
    if not (SWITCH.compiled and nf4_kernel.STATE.enabled and rows <= MAX_ROWS):
        return None
    if int8_form is not None and SWITCH.int8:
        return (*int8_form, None, bias)
    return (None, None, weight, bias)


def output_layer_product(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, int8_form=None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for the few rows of a decode step, with the weight streamed once (in its
    exact int8 form where one is given)."""
    compiled = compiled_product(weight, bias, x.numel() // x.shape[-1], int8_form)
    if compiled is not None:
        q8, scales, dense, _ = compiled
        if q8 is not None:
            return torch.ops.lora_lens.q8_rows_gemm(x, q8, scales, bias)
        return torch.ops.lora_lens.dense_rows_gemm(x, dense, bias)
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
    int8 = {"weight": None, "version": None, "form": None}

    def int8_form():
        # found once; again only if the weight is replaced or changed in place
        weight = head.weight
        if int8["weight"] is not weight or int8["version"] != weight._version:
            int8.update(weight=weight, version=weight._version, form=exact_int8_form(weight))
        return int8["form"]

    def forward(x):
        if (
            not SWITCH.enabled
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or torch.is_grad_enabled()
            or x.numel() // x.shape[-1] > MAX_ROWS
        ):
            return plain_forward(x)
        form = int8_form() if nf4_kernel.STATE.registered else None
        return output_layer_product(x, head.weight, head.bias, form)

    head.forward = forward
    head._lora_lens_decode_path = True
    head._lora_lens_decode_forward = forward
    head._lora_lens_int8_form = int8_form
    if nf4_kernel.STATE.registered:
        int8_form()  # at load (0.2 s for SmolLM2's output layer), not in the first answer's time
    return True


def compiled_head_args(head, rows: int) -> tuple | None:
    """The output layer as `lora_lens::decode_steps` takes it for a decode step of `rows` rows, (int8, scales,
    None, bias) or (None, None, weight, bias): the compiled product its forward (speed_up_output_layer) would call
    for those rows now; None where that forward would take another path or has been replaced."""
    if not getattr(head, "_lora_lens_decode_path", False) or head.__dict__.get("forward") is not getattr(
        head, "_lora_lens_decode_forward", None
    ):
        return None
    # the forward's own conditions (speed_up_output_layer), for float32 rows on the CPU
    if not (SWITCH.enabled and nf4_kernel.STATE.registered) or torch.is_grad_enabled():
        return None
    if head.weight.device.type != "cpu":
        return None
    return compiled_product(head.weight, head.bias, rows, head._lora_lens_int8_form())
