"""A dummy MoE model's drawn routing scores in one Triton launch on CUDA.

Dummy routers (models/moe.py drawn_experts) draw each token's experts from a stated
distribution by Gumbel top-k over a hash of the token's hidden state: in torch that is ~50
elementwise kernels per layer call, about a third of a 4-bit MoE layer's launches (S6q's H100
profile: 174 launches per GPU batch and layer, the step host-bound), where a real router runs a
GEMM, a softmax and a top-k. This kernel computes the same integer hash and the same Gumbel
scores for a row of experts per program; torch's top-k then picks them. The hash is exact
integer arithmetic; the two logarithms may differ from torch's in the last bit.
FLEXRUN_TRITON_ROUTING=0 keeps the torch ops.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:             # CPU-only installs: the torch ops are used
    triton = None

from flexrun.kernels.dequant import on_device
from flexrun.kernels.fallback import Fallback

MASK = 0xFFFFFFFF
HEAD = 16                       # hidden values hashed per token

if triton is not None:
    @triton.jit
    def _mix(x):
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
        return (x >> 16) ^ x

    @triton.jit
    def _drawn_kernel(X, stride_x, OUT, E, n, seed, zipf_s, INT_T: tl.constexpr,
                      ZIPF: tl.constexpr, HEAD_B: tl.constexpr, BLOCK_E: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, HEAD_B)
        v = tl.load(X + t * stride_x + cols, mask=cols < n, other=0.0)
        bits = v.to(INT_T, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        coef = (cols.to(tl.int64) * 7919 % 65521) * 2 + 1
        total = tl.sum(tl.where(cols < n, bits * coef, 0), 0)
        key = _mix(_mix(total & 0xFFFFFFFF) ^ seed)
        ids = tl.arange(0, BLOCK_E).to(tl.int64)
        u = _mix(key ^ (ids * 0x85EBCA6B & 0xFFFFFFFF))
        u = ((u >> 8).to(tl.float32) + 0.5) / 16777216.0
        scores = -tl.log(-tl.log(u))
        if ZIPF:
            scores = scores - zipf_s * tl.log(ids.to(tl.float32) + 1.0)
        tl.store(OUT + t * E + ids, scores, mask=ids < E)


FALLBACK = Fallback("drawn-routing")


def applies(x: torch.Tensor, E: int) -> bool:
    """Whether the kernel may draw for hidden states x (tokens, hidden)."""
    return (triton is not None and FALLBACK.on
            and os.environ.get("FLEXRUN_TRITON_ROUTING", "1") == "1"
            and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and x.dim() == 2
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and x.stride(-1) == 1 and 0 < E <= 4096 and x.shape[0] > 0)


def drawn_scores(x: torch.Tensor, E: int, seed: int, zipf_s: float | None) -> torch.Tensor:
    """(tokens, E) fp32 Gumbel scores of models/moe.drawn_experts (see `applies`)."""
    out = torch.empty(x.shape[0], E, dtype=torch.float32, device=x.device)
    int_t = tl.int32 if x.element_size() == 4 else tl.int16
    with on_device(x.device):
        _drawn_kernel[(x.shape[0],)](
            x, x.stride(0), out, E, min(x.shape[1], HEAD), seed & MASK,
            float(zipf_s or 0.0), INT_T=int_t, ZIPF=zipf_s is not None, HEAD_B=HEAD,
            BLOCK_E=max(16, triton.next_power_of_2(E)), num_warps=1 if E <= 256 else 4)
    return out
