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

import contextlib
import functools
import os
from typing import NamedTuple

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
        with on_device(out.device):
            _dequant4_kernel[grid](c.data, c.mins, c.scales, out, n,
                                   HALF_GROUP=c.group_size // 2, BLOCK=_BLOCK)
    return out


# ---- 4-bit weight x fp16 activations in one kernel (decode-sized row counts) ---------------
# Decode multiplies a few rows by every weight: the plain path writes the whole fp16 weight
# to HBM and reads it back (2.5 + 4 bytes per weight moved); this kernel reads the packed
# codes and the group mins/scales (~0.56 bytes per weight at group 64) and dequantizes in
# registers right before tl.dot. Above FUSED_MAX_ROWS rows (prefill) the GEMM is compute
# bound and dequantize-then-cuBLAS is faster.
# On the H100 (bench/w4_probe.py, first version of the probe) the fused kernel took
# 0.115 vs 0.348 ms at 32 rows x (28672 x 7168) and 0.318 vs 0.349 ms at 128 rows.
FUSED_MAX_ROWS = int(os.environ.get("FLEXRUN_FUSED_MAX_ROWS", "128"))
_GROUPS = (32, 64, 128)          # group sizes the fused matmul handles (BLOCK_K % G == 0)


class Tiles(NamedTuple):
    """A fused matmul's launch: weight rows (output columns) and weight columns per tile,
    warps, pipeline stages, x rows per tile (None: from the row count), and which kernel:
    x-first (`_w4_matmul_kernel`) or weight-first (`_w4_matmul_t_kernel`)."""
    block_n: int
    block_k: int
    warps: int
    stages: int
    block_m: int | None = None
    weight_first: bool = False


def w4_config(rows: int, n: int, k: int) -> Tiles:
    """The fastest tiles of the H100 probe (bench/w4_probe.py) for the row count and weight
    shape (n, k)."""
    # The weight-first kernel won for long reductions (OPT-30B fc2, Llama-70B down) at every
    # row count and for wide weights (fc1, gate/up) up to 32 rows: 18-28% less time, e.g.
    # down at 128 rows 0.209 against 0.281 ms, fc1 at 32 rows 0.085 against 0.112
    # (bench/results/w4-probe-H100.json). Elsewhere the x-first kernel stays ahead.
    kind = os.environ.get("FLEXRUN_W4_KERNEL", "auto")     # or weight-first / x-first
    if kind == "weight-first" or (kind == "auto" and k >= 16384):
        return Tiles(64, 512 if 16 < rows <= 32 else 256, 4, 3, weight_first=True)
    if kind == "auto" and n >= 16384 and rows <= 32:
        return Tiles(128, 128, 4, 3, weight_first=True) if rows > 16 else \
            Tiles(64, 256, 4, 3, weight_first=True)
    # Above 64 rows, one 128-row tile dequantizes each weight tile once: 18-40% faster in
    # the probe at 128 rows (bench/results/w4-probe-H100.json), and S5 (Llama-70B, 128 rows)
    # measured 121 against 137 ms/step with (128, 256, 8, 3) in one run on one machine
    # (FLEXRUN_W4_M128=0 gives the old tiles back). Narrow weights keep the 64-row tile.
    # A weight narrower than 132 SMs x 128 columns takes 64-wide tiles, so its tiles fill the
    # GPU: Llama-70B's q/o (8192 x 8192) at 128 rows took 0.075 ms against 0.176 with
    # 128-wide ones, and its k/v (1024 x 8192) 0.066 against 0.167 with 32-wide tiles
    # (bench/w4_probe.py at 128 rows).
    if rows > 64:
        if os.environ.get("FLEXRUN_W4_M128", "1") != "1":
            return Tiles(128, 256, 8, 3)
        if n < 4096:
            return Tiles(32, 128, 4, 4)
        return Tiles(128, 64, 8, 4, 128) if n >= 16384 else Tiles(64, 128, 8, 3, 128)
    return Tiles(32, 128, 4, 4) if n < 4096 else Tiles(64, 256, 4, 3)


if triton is not None:
    @triton.jit
    def _code_f16(code):
        """4-bit codes (int32, 0..15) as fp16 without a conversion instruction: the bits
        0x6400 | q are the fp16 1024 + q. Int-to-float conversions run at a fraction of the
        FMA rate; in the weight-first kernel they cost 10-30% of the time."""
        return (code | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True) - 1024.0

    @triton.jit
    def w4_tile(codes, mins, scales, rn, n_in, k0, HALF_K, NG, G: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr):
        """The (BN, BK) fp16 tile of a 4-bit weight (rows rn, columns k0..k0+BK; codes two
        a byte, low nibble first, half_k bytes a row; NG fp16 mins and scales a row),
        dequantized as decompress does: fp32 q * scale + min, rounded to fp16."""
        rkb = tl.arange(0, BK // 2)
        rg = tl.arange(0, BK // G)
        kb_in = (k0 // 2 + rkb) < HALF_K
        byte = tl.load(codes + rn[:, None] * HALF_K + (k0 // 2 + rkb)[None, :],
                       mask=n_in[:, None] & kb_in[None, :], other=0).to(tl.int32)
        lo = (byte & 0xF).to(tl.float32)
        hi = (byte >> 4).to(tl.float32)
        q = tl.reshape(tl.join(lo, hi), (BN, BK // G, G))
        g_in = n_in[:, None] & ((k0 // G + rg) < NG)[None, :]
        gofs = rn[:, None] * NG + (k0 // G + rg)[None, :]
        mn = tl.load(mins + gofs, mask=g_in, other=0.0).to(tl.float32)
        sc = tl.load(scales + gofs, mask=g_in, other=0.0).to(tl.float32)
        w = (q * sc[:, :, None] + mn[:, :, None]).to(tl.float16)
        return tl.reshape(w, (BN, BK))

    @triton.jit
    def _w4_matmul_kernel(x_ptr, data_ptr, mins_ptr, scales_ptr, bias_ptr, y_ptr, M, N,
                          K: tl.constexpr,
                          G: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_in = rm < M
        n_in = rn < N
        half_k = K // 2
        ngroups = K // G
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):      # K constexpr: one compile per width
            w = w4_tile(data_ptr, mins_ptr, scales_ptr, rn, n_in, k0, half_k, ngroups, G,
                        BLOCK_N, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :],
                        mask=m_in[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_in, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_in[:, None] & n_in[None, :])

    @triton.jit
    def _w4_matmul_t_kernel(xp_ptr, data_ptr, mins_ptr, scales_ptr, bias_ptr, y_ptr, M, N,
                            K: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_KB: tl.constexpr):
        # y^T = W x^T, the dequantized weight tile the first operand (wgmma's 64-row
        # minimum falls on the weight, not on the few rows of x). Low and high nibbles are
        # multiplied separately against x's even and odd columns (xp: (2, M, K/2)), so the
        # tile is never interleaved; values are dequantized in fp16 (one fma each).
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rb = tl.arange(0, BLOCK_KB)
        HG: tl.constexpr = G // 2
        rg = tl.arange(0, BLOCK_KB // HG)
        m_in = rm < M
        n_in = rn < N
        half_k: tl.constexpr = K // 2
        ngroups: tl.constexpr = K // G
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for kb0 in range(0, half_k, BLOCK_KB):
            b_in = (kb0 + rb) < half_k
            byte = tl.load(data_ptr + rn[:, None] * half_k + (kb0 + rb)[None, :],
                           mask=n_in[:, None] & b_in[None, :], other=0).to(tl.int32)
            g_in = n_in[:, None] & ((kb0 // HG + rg) < ngroups)[None, :]
            gofs = rn[:, None] * ngroups + (kb0 // HG + rg)[None, :]
            mn = tl.load(mins_ptr + gofs, mask=g_in, other=0.0)[:, :, None]
            sc = tl.load(scales_ptr + gofs, mask=g_in, other=0.0)[:, :, None]
            lo = tl.reshape(_code_f16(byte & 0xF), (BLOCK_N, BLOCK_KB // HG, HG))
            hi = tl.reshape(_code_f16(byte >> 4), (BLOCK_N, BLOCK_KB // HG, HG))
            w_lo = tl.reshape(lo * sc + mn, (BLOCK_N, BLOCK_KB))
            w_hi = tl.reshape(hi * sc + mn, (BLOCK_N, BLOCK_KB))
            xofs = rm[:, None] * half_k + (kb0 + rb)[None, :]
            x_in = m_in[:, None] & b_in[None, :]
            xe = tl.load(xp_ptr + xofs, mask=x_in, other=0.0)
            xo = tl.load(xp_ptr + M * half_k + xofs, mask=x_in, other=0.0)
            acc = tl.dot(w_lo, tl.trans(xe), acc)
            acc = tl.dot(w_hi, tl.trans(xo), acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_in, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rm[None, :] * N + rn[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=n_in[:, None] & m_in[None, :])


def fused_applies(bits: int, group_size: int, dtype_bytes: int) -> bool:
    """Whether decode-sized matmuls of weights compressed this way take the fused kernel on
    CUDA (for the cost model: decided from the policy, not from this machine's Triton)."""
    return (bits == 4 and group_size in _GROUPS and dtype_bytes == 2
            and os.environ.get("FLEXRUN_PLAIN_DEQUANT", "0") != "1")


def fused_linear_ok(x: torch.Tensor, c) -> bool:
    """True when y = x @ decompress(c)^T may take the fused 4-bit matmul."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (triton is not None and x.dtype == torch.float16
            and fused_applies(c.bits, c.group_size, x.element_size()) and len(c.shape) == 2
            and c.shape[1] == x.shape[-1] and 1 <= rows <= FUSED_MAX_ROWS
            and supports(c, torch.float16)
            and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))


def linear4(x: torch.Tensor, c, bias: torch.Tensor | None = None,
            config: tuple | None = None) -> torch.Tensor:
    """y = x W^T + b with W 4-bit compressed (see `fused_linear_ok`), in one kernel.
    config: a `Tiles` (or a tuple of its fields), default `w4_config`.

    The x-first kernel dequantizes as decompress does (fp32 q*scale+min, rounded to fp16),
    the weight-first one in fp16 (q*scale+min in one fma: within an ulp of it); only the
    summation order differs from decompress + F.linear otherwise."""
    n, k = c.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    t = Tiles(*(config or w4_config(m, n, k)))
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    b = y if bias is None else bias.to(device=x.device, dtype=x.dtype).contiguous()
    if t.weight_first:
        block_m = t.block_m or max(16, 1 << (m - 1).bit_length())
        x2 = x2.view(m, k // 2, 2).permute(2, 0, 1).contiguous()   # even columns, then odd
        kernel, block = _w4_matmul_t_kernel, {"BLOCK_KB": max(t.block_k, c.group_size) // 2}
    else:
        block_m = t.block_m or (16 if m <= 16 else 32 if m <= 32 else 64)
        x2 = x2.contiguous()
        kernel, block = _w4_matmul_kernel, {"BLOCK_K": max(t.block_k, c.group_size)}
    grid = (triton.cdiv(n, t.block_n), triton.cdiv(m, block_m))
    with on_device(x.device):
        kernel[grid](x2, c.data, c.mins, c.scales, b, y, m, n, K=k, G=c.group_size,
                     HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=t.block_n, **block,
                     num_warps=t.warps, num_stages=t.stages)
    return y.view(*x.shape[:-1], n)


def on_device(device: torch.device):
    """Launch on `device` whatever the current CUDA device is (a no-op off CUDA)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)         # called per decode-step quantization: computed once
def inv_levels(bits: int) -> float:
    """1 / (2**bits - 1) rounded to fp32: a group's scale is (max - min) times it, on every
    device and in every kernel (CUDA's `tensor / scalar` multiplies by this reciprocal, the
    CPU's divides: one definition keeps the two, and the Triton kernels, bit for bit alike)."""
    return float(torch.tensor(1.0) / torch.tensor(float(2 ** bits - 1)))
