"""gpt-oss checkpoints' experts in MXFP4 (OCP microscaling FP4), read back to plain tensors.

The Hub files hold each layer's experts as `mlp.experts.gate_up_proj_blocks` (E, 2 ffn,
hidden / 32, 16) and `down_proj_blocks` (E, hidden, ffn / 32, 16): bytes of two E2M1 values
each (low nibble first), one power-of-two scale per block of 32 along the input dimension in
`*_scales` (E, rows, blocks), biased by 127. Dequantized, a gate_up row r is gate row r / 2
(even r) or up row r / 2 (odd r), as transformers' convert_moe_packed_tensors lays them out
before transposing; each expert is dequantized on its own, so a layer is never held whole.
"""
from __future__ import annotations

from typing import Iterator

import torch

# the E2M1 values of the 16 codes (sign in bit 3)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(..., G, 16) uint8 codes and (..., G) uint8 scales -> (..., G * 32) values."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales "
                         f"{tuple(scales.shape)} do not match")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = blocks.to(torch.uint8)
    pairs = torch.stack((lut[(codes & 0x0F).long()], lut[(codes >> 4).long()]), -1)
    exp = scales.to(torch.int32) - 127
    vals = torch.ldexp(pairs.flatten(-2), exp[..., None].to(torch.float32))
    return vals.flatten(-2).to(dtype)


def split_experts(names: list[str], blocks: torch.Tensor, scales: torch.Tensor,
                  gate_up: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, weight) of each expert of one stacked MXFP4 tensor: names lists each expert's
    gate then up (gate_up) or its down, in expert order; weights (ffn, hidden) / (hidden,
    ffn) as nn.Linear holds them."""
    parts = iter(names)
    for e in range(blocks.shape[0]):
        w = dequantize(blocks[e], scales[e])
        if gate_up:
            yield next(parts), w[0::2].contiguous()
            yield next(parts), w[1::2].contiguous()
        else:
            yield next(parts), w
