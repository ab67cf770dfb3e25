"""Fused 4-bit dequantization on CUDA: one Triton pass from packed codes to fp16.

The plain path (`quant.decompress`) unpacks nibbles, widens to fp32 and casts back: several
full-size intermediates per weight, about 300 ms per decode step for OPT-30B on the H100.
This kernel reads each packed byte once and writes the two output values once (2.5 bytes
per weight instead of ~14). It handles the layout that weights and the KV cache use: 4-bit
codes grouped along the last axis, no padding; anything else (bf16 output included: its
rounding differs from torch's by an ulp) falls back to the plain path.
`quant.decompress` stays the reference; tests compare the two.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:             # CPU-only installs: the plain path is used
    triton = None

_BLOCK = 1024                   # packed bytes per program (2048 output values)

if triton is not None:
    @triton.jit
    def _dequant4_kernel(data_ptr, mins_ptr, scales_ptr, out_ptr, nbytes,
                         HALF_GROUP: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inside = offs < nbytes
        byte = tl.load(data_ptr + offs, mask=inside, other=0).to(tl.int32)
        group = offs // HALF_GROUP
        mn = tl.load(mins_ptr + group, mask=inside, other=0.0).to(tl.float32)
        sc = tl.load(scales_ptr + group, mask=inside, other=0.0).to(tl.float32)
        lo = (byte & 0xF).to(tl.float32) * sc + mn
        hi = (byte >> 4).to(tl.float32) * sc + mn
        vals = tl.reshape(tl.join(lo, hi), (2 * BLOCK,))
        out = pid * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + out, vals.to(out_ptr.dtype.element_ty), mask=out < 2 * nbytes)


def enabled() -> bool:
    """Whether the fused kernel may be used (FLEXRUN_PLAIN_DEQUANT=1 turns it off)."""
    return triton is not None and os.environ.get("FLEXRUN_PLAIN_DEQUANT", "0") != "1"


def supports(c, dtype: torch.dtype) -> bool:
    """True when `c` (a quant.Compressed) has the layout this kernel handles."""
    return (c.bits == 4 and c.pad == 0 and c.dim == len(c.shape) - 1
            and c.group_size % 2 == 0 and dtype == torch.float16
            and c.data.numel() * 2 == c.mins.numel() * c.group_size
            and (c.data.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
            and c.data.is_contiguous() and c.mins.is_contiguous()
            and c.scales.is_contiguous())


def dequantize4(c, dtype: torch.dtype) -> torch.Tensor:
    """Decompress `c` (see `supports`) into a new contiguous tensor of c.shape and dtype."""
    out = torch.empty(c.shape, dtype=dtype, device=c.data.device)
    n = c.data.numel()
    if n:
        grid = (triton.cdiv(n, _BLOCK),)
        _dequant4_kernel[grid](c.data, c.mins, c.scales, out, n,
                               HALF_GROUP=c.group_size // 2, BLOCK=_BLOCK)
    return out
