"""The synth weight scheme's clipping-range search (memory/wquant._grid) in one Triton pass.

torch runs the search as ~12 kernels per candidate over each chunk of groups, each reading
and writing fp32 temporaries: 81 candidates made Mixtral-8x7B's 4-bit load take 289 s on an
H100 (beside a stray run). Here each program holds a tile of groups in registers, tries every
candidate (RTN first, then each end shrunk by GRID's fractions, as _grid does) and keeps a
group's best by strictly smaller weighted squared error. Candidates are formed as torch on
CUDA forms them (a scale is the range times an fp32 reciprocal, no fused multiply-adds, codes
by round-to-nearest division), but the error sums run in another order, so of two candidates
within an ulp of each other either may win (torch on the CPU divides exactly: there a few
groups in a thousand may pick another candidate); codes are then encoded by torch
(quant.encode) from the chosen fp16 (min, scale). FLEXRUN_TRITON_QUANT=0 keeps torch.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:             # CPU-only installs: torch's search is used
    triton = None

from flexrun.kernels.dequant import inv_levels, on_device

if triton is not None:
    @triton.jit
    def _round_half_even(v):
        f = tl.floor(v)
        d = v - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        up = (d > 0.5) | ((d == 0.5) & odd)
        return tl.where(up, f + 1.0, f)

    @triton.jit
    def _err(g, w, m, s, LEVELS: tl.constexpr):
        """Weighted squared error of each row of g coded with fp32 (m, s) as encode /
        decompress do (a zero scale codes every value 0)."""
        safe = tl.where(s > 0.0, s, 1.0)
        q = _round_half_even(tl.math.div_rn(g - m[:, None], safe[:, None]))   # torch's "/"
        q = tl.minimum(tl.maximum(q, 0.0), LEVELS)
        q = tl.where((s > 0.0)[:, None], q, 0.0)
        d = m[:, None] + q * s[:, None] - g
        return tl.sum(d * d * w, 1)

    @triton.jit
    def _grid_kernel(G, W, GRID, MIN, SCALE, rows, ngroups, inv,
                     LEVELS: tl.constexpr, NGRID: tl.constexpr, GS: tl.constexpr,
                     BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = r < rows
        cols = tl.arange(0, GS)
        g = tl.load(G + r[:, None] * GS + cols[None, :], mask=inside[:, None], other=0.0)
        w = tl.load(W + (r % ngroups)[:, None] * GS + cols[None, :], mask=inside[:, None],
                    other=0.0)
        mn, mx = tl.min(g, 1), tl.max(g, 1)
        rng = mx - mn
        best_m = mn.to(tl.float16)
        best_s = (rng * inv).to(tl.float16)   # as memory/quant.py's scale_of
        best = _err(g, w, best_m.to(tl.float32), best_s.to(tl.float32), LEVELS)
        for i in range(NGRID):
            a = tl.load(GRID + i)
            for j in range(NGRID):
                if i + j > 0:
                    b = tl.load(GRID + j)
                    lo, hi = mn + a * rng, mx - b * rng
                    m16 = lo.to(tl.float16)
                    s16 = ((hi - lo) * inv).to(tl.float16)
                    e = _err(g, w, m16.to(tl.float32), s16.to(tl.float32), LEVELS)
                    better = e < best
                    best = tl.where(better, e, best)
                    best_m = tl.where(better, m16, best_m)
                    best_s = tl.where(better, s16, best_s)
        tl.store(MIN + r, best_m, mask=inside)
        tl.store(SCALE + r, best_s, mask=inside)


def applies(g: torch.Tensor) -> bool:
    """Whether the kernel may search the groups g (fp32, (..., ngroups, group))."""
    gs = g.shape[-1]
    return (triton is not None and os.environ.get("FLEXRUN_TRITON_QUANT", "1") == "1"
            and (g.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
            and g.dtype == torch.float32 and gs >= 16 and gs & (gs - 1) == 0 and gs <= 256
            and g.numel() > 0)


def grid_search(g: torch.Tensor, w: torch.Tensor, grid: list[float], bits: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (min, scale) of each group of g (out, ngroups, group) by the weighted grid
    search; w (1, ngroups, group): the channels' weights. Shapes as minmax gives them."""
    out, ngroups, gs = g.shape
    g2 = g.reshape(-1, gs).contiguous()
    w2 = w.reshape(ngroups, gs).to(g.device, torch.float32).contiguous()
    fracs = torch.tensor(grid, dtype=torch.float32, device=g.device)
    rows = g2.shape[0]
    mins = torch.empty(rows, dtype=torch.float16, device=g.device)
    scales = torch.empty_like(mins)
    block = max(1, min(64, 4096 // gs))
    levels = 2 ** bits - 1
    inv = inv_levels(bits)
    with on_device(g.device):       # no fused multiply-adds: lo and hi round as torch's do
        _grid_kernel[(triton.cdiv(rows, block),)](
            g2, w2, fracs, mins, scales, rows, ngroups, inv, LEVELS=float(levels),
            NGRID=len(grid), GS=gs, BLOCK=block, num_warps=4, enable_fp_fusion=False)
    return mins.view(out, ngroups, 1), scales.view(out, ngroups, 1)
