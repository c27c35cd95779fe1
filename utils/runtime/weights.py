"""The adapter's and the base's weights as the anatomy reads them: LoRA A and B per adapted layer, and each base
weight in float32, de-quantized from 4 bits one layer at a time (bitsandbytes' layouts, its CPU-packed one too).
"""

from __future__ import annotations

import torch

from utils.core.seam import LoraWeights


def lora_weights(router, adapter: int = 0, originals=None) -> list[LoraWeights]:
    """Every layer the adapter at this position of the router adapts, in the router's order (the caller holds
    the model's lock). `originals` (utils/runtime/merging.OriginalWeights) reads the base's own weights."""
    from utils.runtime.merging import requantized

    peft_name = router.adapter_names[adapter]
    return [
        LoraWeights(
            name=router.names[i],
            a=router.layers[i].lora_A[peft_name].weight.detach(),
            b=router.layers[i].lora_B[peft_name].weight.detach(),
            scaling=router.stacks[i].spans[adapter][2],
            base_weight=lambda layer=router.layers[i]: base_weight(layer),
            requantize=requantized(router.layers[i]),
            original_weight=(
                None if originals is None else (lambda name=router.names[i]: originals.weight(name))
            ),
        )
        for i in router.layers_of(adapter)
    ]


def base_weight(layer) -> torch.Tensor:
    """The layer's base weight in float32, de-quantized when it is held in 4 bits (this layer only)."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else getattr(layer, "base_layer", layer)
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        if getattr(quant_state, "packing_format_for_cpu", False):
            return _dequantize_cpu_packed(weight.data, quant_state)
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).float()
    return weight.detach().float()


def _dequantize_cpu_packed(packed: torch.Tensor, quant_state, block_n: int = 32) -> torch.Tensor:
    """A weight that bitsandbytes repacked for its AVX512-BF16 CPU kernel (on its first forward pass), read
    without changing it: nibbles in blocks of 32 output rows ([N, K/2], low nibbles the first 32 of every 64
    values), scales as [K / blocksize, N] in bf16. The values are the ones that kernel multiplies by."""
    n, k = quant_state.shape
    pairs = packed.view(torch.uint8).reshape(-1, block_n)
    codes = torch.cat([pairs & 0xF, pairs >> 4], dim=-1)  # [.., 64]: 32 low nibbles, then 32 high
    codes = codes.reshape(n // block_n, k // 2, block_n, 2).transpose(1, 2).reshape(n, k).long()
    values = quant_state.code.float()[codes]
    scales = quant_state.absmax.float().T.repeat_interleave(quant_state.blocksize, dim=1)
    return values * scales
