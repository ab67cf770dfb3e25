"""LayerNorm and RMSNorm in one Triton pass on CUDA, optionally adding the residual first.

In a decode step the norms are latency-bound: torch's layer_norm kernel took 8.3 us for
32 x 4096 fp16 (one block per row on 32 SMs), twice per layer, and the residual add before
the second another 1.7 us (S3 trace, H100). This kernel adds the residual (the sum is stored,
rounded as torch rounds it) and normalizes in the same pass. Statistics are computed in fp32
as torch does, in another order, so results may differ from torch's in the last bit.
FLEXRUN_TRITON_NORM=0 keeps torch's kernels.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:             # CPU-only installs: torch's kernels are used
    triton = None

from flexrun.kernels.dequant import on_device

if triton is not None:
    @triton.jit
    def _norm_kernel(X, R, Hout, W, B, Y, N, eps, HAS_RES: tl.constexpr,
                     RMS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < N
        x = tl.load(X + row * N + cols, mask=inside, other=0.0)
        if HAS_RES:
            x = x + tl.load(R + row * N + cols, mask=inside, other=0.0)
            tl.store(Hout + row * N + cols, x, mask=inside)
        xf = x.to(tl.float32)
        w = tl.load(W + cols, mask=inside, other=0.0)
        if RMS:     # HF Llama: weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)
            var = tl.sum(xf * xf, 0) / N
            y = w * (xf * tl.rsqrt(var + eps)).to(x.dtype)
        else:
            mean = tl.sum(xf, 0) / N
            xc = tl.where(inside, xf - mean, 0.0)
            var = tl.sum(xc * xc, 0) / N
            b = tl.load(B + cols, mask=inside, other=0.0)
            y = xc * tl.rsqrt(var + eps) * w.to(tl.float32) + b.to(tl.float32)
        tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=inside)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the Triton kernel may normalize x (its last axis) with this weight."""
    return (triton is not None and os.environ.get("FLEXRUN_TRITON_NORM", "1") == "1"
            and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and weight.dtype == x.dtype and weight.device == x.device
            and x.shape[-1] <= 16384 and x.numel() > 0)


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
         rms: bool, residual: torch.Tensor | None = None
         ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(x + residual or None, the norm of that sum): LayerNorm (weight, bias) or RMSNorm
    (weight only, HF Llama's rounding). See `applies`."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    y = torch.empty_like(x2)
    h = None
    if residual is not None:
        r2 = residual.reshape(-1, n).to(x.dtype).contiguous()
        h = torch.empty_like(x2)
    block = triton.next_power_of_2(n)
    with on_device(x.device):
        _norm_kernel[(x2.shape[0],)](
            x2, r2 if h is not None else x2, h if h is not None else y, weight,
            bias if bias is not None else weight, y, n, eps, HAS_RES=h is not None,
            RMS=rms, BLOCK=block, num_warps=min(16, max(4, block // 512)))
    shape = x.shape
    return (None if h is None else h.view(shape)), y.view(shape)
