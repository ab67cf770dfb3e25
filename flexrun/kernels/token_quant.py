"""Per-token 4-bit quantization of new KV rows in one Triton launch on CUDA.

A decode step appends one token's values (and, per the scheme, keys) to each layer's 4-bit
cache: in torch that is ~20 small kernels per call (min, max, the fp16 parameters, the
division, rounding, clamping, packing), part of the ~170 launches that make a 4-bit MoE layer
call host-bound (S6q's H100 profile). This kernel computes the same codes, fp16 mins and fp16
scales as engine/kvquant.py's `_per_token` (memory/quant.py minmax/encode/pack: the scale as
`scale_of`, codes by IEEE division rounded half to even, a zero scale coding 0), one program
per row of head_dim values.
FLEXRUN_TRITON_TOKEN_QUANT=0 keeps the torch ops.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:             # CPU-only installs: the torch ops are used
    triton = None

from flexrun.kernels.dequant import inv_levels, on_device
from flexrun.kernels.fallback import Fallback

if triton is not None:
    from flexrun.kernels.quant_search import _round_half_even

    @triton.jit
    def _code(x, mn, safe, zero):
        q = _round_half_even(tl.math.div_rn(x - mn[:, None], safe[:, None]))
        q = tl.minimum(tl.maximum(q, 0.0), 15.0)
        return tl.where(zero[:, None], 0.0, q).to(tl.uint8)

    @triton.jit
    def _token_quant_kernel(X, C, MN, SC, inv, HD: tl.constexpr, GROUP: tl.constexpr):
        """One row of HD values: even and odd positions loaded apart, so that each byte's
        low nibble (even) and high nibble (odd) come out in place."""
        row = tl.program_id(0).to(tl.int64)
        half = tl.arange(0, HD // 2)
        lo = tl.load(X + row * HD + 2 * half).to(tl.float32)
        hi = tl.load(X + row * HD + 2 * half + 1).to(tl.float32)
        lo = tl.reshape(lo, (HD // GROUP, GROUP // 2))
        hi = tl.reshape(hi, (HD // GROUP, GROUP // 2))
        mn = tl.minimum(tl.min(lo, 1), tl.min(hi, 1))
        mx = tl.maximum(tl.max(lo, 1), tl.max(hi, 1))
        mn16 = mn.to(tl.float16)
        sc16 = ((mx - mn) * inv).to(tl.float16)       # as memory/quant.py's scale_of
        mnf, scf = mn16.to(tl.float32), sc16.to(tl.float32)
        zero = scf == 0.0
        safe = tl.where(zero, 1.0, scf)
        packed = _code(lo, mnf, safe, zero) | (_code(hi, mnf, safe, zero) << 4)
        tl.store(C + row * (HD // 2) + half, tl.reshape(packed, (HD // 2,)))
        groups = tl.arange(0, HD // GROUP)
        tl.store(MN + row * (HD // GROUP) + groups, mn16)
        tl.store(SC + row * (HD // GROUP) + groups, sc16)


FALLBACK = Fallback("token quantization")


def applies(x: torch.Tensor, group: int, bits: int) -> bool:
    """Whether the kernel may quantize x (..., hd) in groups of `group` along hd."""
    hd = x.shape[-1]
    return (triton is not None and FALLBACK.on
            and os.environ.get("FLEXRUN_TRITON_TOKEN_QUANT", "1") == "1"
            and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and bits == 4
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and 16 <= hd <= 1024 and hd & (hd - 1) == 0 and 2 <= group <= hd
            and group & (group - 1) == 0 and x.numel() > 0)


def quantize_tokens(x: torch.Tensor, group: int) -> tuple[torch.Tensor, ...]:
    """(codes (..., hd/2) uint8, mins and scales (..., hd/group) fp16) of x (see `applies`)."""
    hd = x.shape[-1]
    rows = x.reshape(-1, hd).contiguous()
    codes = torch.empty(rows.shape[0], hd // 2, dtype=torch.uint8, device=x.device)
    mins = torch.empty(rows.shape[0], hd // group, dtype=torch.float16, device=x.device)
    scales = torch.empty_like(mins)
    with on_device(x.device):
        _token_quant_kernel[(rows.shape[0],)](rows, codes, mins, scales, inv_levels(4), HD=hd,
                                              GROUP=group, num_warps=1 if hd <= 128 else 2)
    lead = x.shape[:-1]
    return codes.view(*lead, hd // 2), mins.view(*lead, -1), scales.view(*lead, -1)
