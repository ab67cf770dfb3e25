"""Small building blocks shared by the model families."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dense(w) -> torch.Tensor:
    """A weight as a plain tensor (4-bit compressed weights are decompressed here, on use)."""
    if isinstance(w, torch.Tensor):
        return w
    from ..quant import decompress
    return decompress(w)


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b; W may arrive compressed and is decompressed on the compute device
    (decode-sized inputs on CUDA multiply the 4-bit codes directly: dequant_triton.linear4)."""
    if not isinstance(w, torch.Tensor):
        from .. import dequant_triton
        if dequant_triton.fused_linear_ok(x, w):
            return dequant_triton.linear4(x, w, b)
    return F.linear(x, dense(w).to(x.dtype), None if b is None else b.to(x.dtype))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, as in HF Llama."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, s, heads*hd) -> (b, s, heads, hd)."""
    b, s, _ = x.shape
    return x.view(b, s, heads, -1)
