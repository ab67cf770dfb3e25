"""Small building blocks shared by the model families."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from flexrun.kernels import norms as norm_triton
from flexrun.memory.packed import Packed
from flexrun.memory.quant import Compressed, rows_alike


def dense(w) -> torch.Tensor:
    """A weight as a plain tensor (4-bit compressed weights are decompressed here, on use)."""
    if isinstance(w, torch.Tensor):
        return w
    if isinstance(w, Packed):
        return w.dense()
    from flexrun.memory.quant import decompress
    return decompress(w)


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b; W may arrive compressed and is decompressed on the compute device
    (decode-sized inputs on CUDA multiply the 4-bit codes directly: dequant_triton.linear4);
    a bf16 CPU run's weights arrive pre-packed for oneDNN (packed_weights)."""
    if isinstance(w, Packed) and x.dtype == torch.bfloat16:
        return w.linear(x, b)
    if not isinstance(w, (torch.Tensor, Packed)):
        from flexrun.kernels import dequant as dequant_triton
        if dequant_triton.fused_linear_ok(x, w):
            return dequant_triton.linear4(x, w, b)
    return F.linear(x, dense(w).to(x.dtype), None if b is None else b.to(x.dtype))


def linear_relu(x: torch.Tensor, w, b: torch.Tensor | None) -> torch.Tensor:
    """relu(x W^T + b). On CUDA with a plain weight and bias, cuBLASLt applies the ReLU in
    the GEMM's epilogue (torch._addmm_activation), saving a pass over the (rows, ffn) output
    with the same values: OPT-6.7B's fc1 at 32 x 512 rows took 3.23 against 3.31 ms
    (H100, bench/prefill_probe.py)."""
    if (x.is_cuda and isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor)
            and w.dim() == 2 and w.dtype == x.dtype == b.dtype):
        y = torch._addmm_activation(b, x.reshape(-1, x.shape[-1]), w.t())
        return y.view(*x.shape[:-1], w.shape[0])
    return torch.relu_(linear(x, w, b))     # in place: one (b, s, ffn) tensor live


def linear_rows(x: torch.Tensor, ws: list, bs: list) -> list[torch.Tensor]:
    """[x W_i^T + b_i for each i]: one GEMM when the W_i (and the b_i) are consecutive row
    blocks of one buffer (TieredStore.join; 4-bit weights too), else one linear each. At
    decode sizes a GEMM reads its weight at a rate that grows with its size: q/k/v of
    OPT-6.7B at batch 32 took 44.6 us fused against 3 x 30.7 us (H100)."""
    W = joined(ws)
    B = None if all(b is None for b in bs) else joined(bs)
    if W is None or W.dtype != x.dtype or (B is None and any(b is not None for b in bs)):
        return [linear(x, w, b) for w, b in zip(ws, bs)]
    return list(linear(x, W, B).split([w.shape[0] for w in ws], -1))


def joined(ts: list):
    """The tensors (or compressed weights, part by part) as one, if they lie back to back in
    one storage (TieredStore.join); None otherwise."""
    if ts and isinstance(ts[0], Compressed):
        if not rows_alike(ts):
            return None
        parts = {f: joined([getattr(c, f) for c in ts]) for f in ("data", "mins", "scales")}
        if any(p is None for p in parts.values()):
            return None
        return dataclasses.replace(ts[0], **parts,
                                   shape=(sum(c.shape[0] for c in ts), ts[0].shape[1]))
    if not all(isinstance(t, torch.Tensor) and t.is_contiguous() for t in ts):
        return None
    first = ts[0]
    base, ptr = first.untyped_storage().data_ptr(), first.data_ptr()
    for t in ts:
        if t.data_ptr() != ptr or t.untyped_storage().data_ptr() != base or \
                t.dtype != first.dtype or t.shape[1:] != first.shape[1:]:
            return None
        ptr += t.numel() * t.element_size()
    return first.as_strided((sum(t.shape[0] for t in ts),) + tuple(first.shape[1:]),
                            first.stride())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, as in HF Llama (one Triton pass on CUDA)."""
    if norm_triton.applies(x, weight):
        return norm_triton.norm(x, weight, None, eps, rms=True)[1]
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               eps: float) -> torch.Tensor:
    if norm_triton.applies(x, weight):
        return norm_triton.norm(x, weight, bias, eps, rms=False)[1]
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_norm(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + y, its LayerNorm or RMSNorm): the residual add and the next norm, in one Triton
    pass on CUDA."""
    if norm_triton.applies(h, weight) and y.shape == h.shape:
        return norm_triton.norm(h, weight, bias, eps, rms, residual=y)
    h = h + y
    return h, (rms_norm(h, weight, eps) if rms else layer_norm(h, weight, bias, eps))


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, s, heads*hd) -> (b, s, heads, hd)."""
    b, s, _ = x.shape
    return x.view(b, s, heads, -1)
