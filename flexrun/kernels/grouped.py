"""Grouped GEMMs in one Triton kernel: y[rows of group e] = x[rows of group e] @ W[e]^T.

torch._grouped_mm runs one CUTLASS kernel only for bf16 on sm90 / sm100; for fp16 (and other
GPUs) its fallback copies the group offsets to the host and loops over the groups. In a MoE
decode step that is a host sync and ~3 launches per expert in every (layer, GPU batch) call:
S7 (Qwen3-30B-A3B, fp16, H100) spent its step waiting on them, the host unable to run ahead
of the GPU. This kernel reads the offsets on the device: the row blocks of every group are
laid out by a few tensor ops (no sync), the grid covers the most blocks M rows can make, and
blocks past the last group's return at once. So fp16 grouped GEMMs run without a host sync
and can be captured in CUDA graphs. FLEXRUN_TRITON_GROUPED=0 keeps torch's.

Tiles: 64 x 64 by default; 64 x 128 (depth) with 4 pipeline stages when K >= 4096, the
call's row blocks are of 16 (decode) and the device's shared memory holds the stages (80 KB):
they read Mixtral-8x7B's decode gate+up weights at 1.99 against 1.52 TB/s and its down weights at
the same rate (H100, 64 rows; bench.grouped_probe, bench/results/grouped-probe-H100.json).
FLEXRUN_GROUPED_TUNE=1 tunes the tiles per (N, K, rows per block) at the first call instead
(triton.autotune over TUNE_CONFIGS); in that probe its pick was faster for both gate+up GEMMs
but 1.6x slower for Qwen3-30B-A3B's down GEMM (K = 768) than 64 x 64, so it stays opt-in.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:             # CPU-only installs: torch's grouped GEMM is used
    triton = None

from flexrun.kernels.dequant import on_device

if triton is not None:
    @triton.jit
    def row_block(BLOCK_GROUP, BLOCK_ROW, ENDS, E, BM: tl.constexpr):
        """This program's row block (axis 0): its group e (E for a block past the last
        group's: nothing to do), its BM rows and which of them are the group's."""
        pid_b = tl.program_id(0)
        e = tl.load(BLOCK_GROUP + pid_b)
        rm = tl.load(BLOCK_ROW + pid_b) + tl.arange(0, BM)
        return e, rm, rm < tl.load(ENDS + e, mask=e < E, other=0)

    @triton.jit
    def _grouped_kernel(X, W, Y, BLOCK_GROUP, BLOCK_ROW, ENDS, N, E,
                        sxm, sxk, swe, swn, swk, sym, syn, K: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        e, rm, rows = row_block(BLOCK_GROUP, BLOCK_ROW, ENDS, E, BM)
        if e >= E:                      # past the last group's blocks
            return
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        cols = rn < N
        w_base = W + e.to(tl.int64) * swe
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):      # K constexpr: one compile per width
            kk = k0 + rk
            a = tl.load(X + rm[:, None].to(tl.int64) * sxm + kk[None, :] * sxk,
                        mask=rows[:, None] & (kk[None, :] < K), other=0.0)
            b = tl.load(w_base + rn[None, :].to(tl.int64) * swn + kk[:, None] * swk,
                        mask=cols[None, :] & (kk[:, None] < K), other=0.0)
            acc += tl.dot(a, b)
        tl.store(Y + rm[:, None].to(tl.int64) * sym + rn[None, :] * syn,
                 acc.to(Y.dtype.element_ty), mask=rows[:, None] & cols[None, :])

    # (BN, BK, warps, stages): the fixed tiles, wider and deeper ones (more bytes per load),
    # and narrower ones (more programs in flight for a small N)
    TUNE_CONFIGS = [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=st)
                    for bn, bk, w, st in ((64, 64, 4, 3), (128, 64, 4, 4), (64, 128, 4, 4),
                                          (128, 128, 8, 3), (256, 64, 8, 3), (32, 128, 4, 4))]
    # a call only stores into its output, so rerunning it while tuning changes nothing
    _grouped_tuned = triton.autotune(TUNE_CONFIGS, key=["N", "K", "BM"])(_grouped_kernel)


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the Triton kernel runs x's grouped GEMM with the stacked weights w."""
    return (triton is not None and os.environ.get("FLEXRUN_TRITON_GROUPED", "1") == "1"
            and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
            and x.dtype in (torch.float16, torch.bfloat16)     # fp32: tl.dot would be TF32
            and w.dtype == x.dtype and w.device == x.device and x.dim() == 2 and w.dim() == 3)


def _block_rows(rows: int, groups: int) -> int:
    """Rows per block: a decode call gives each expert a few rows, a prefill call many."""
    per = rows / max(groups, 1)
    return 16 if per <= 16 else 32 if per <= 48 else 64


_LAST_LAYOUT: list = []         # [(ends, (version, rows, bm), layout)]: the last one made


def block_layout(ends: torch.Tensor, rows: int, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(group, first row) of each of the cdiv(rows, bm) + E row blocks that `ends` (each
    group's end row, ascending) can make, on its device and without a host sync; blocks past
    the last group's get group E. A MoE call's two grouped GEMMs pass the same `ends`: the
    second reuses the first's layout (~15 small kernels), unless `ends` changed in place or
    a CUDA graph is being captured."""
    key = (ends._version, rows, bm)
    capturing = ends.is_cuda and torch.cuda.is_current_stream_capturing()
    if _LAST_LAYOUT and _LAST_LAYOUT[0][0] is ends and _LAST_LAYOUT[0][1] == key \
            and not capturing:
        return _LAST_LAYOUT[0][2]
    layout = _layout(ends, rows, bm)
    _LAST_LAYOUT[:] = [] if capturing else [(ends, key, layout)]
    return layout


def _layout(ends: torch.Tensor, rows: int, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    E = ends.numel()
    ends = ends.to(torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    blocks = (ends - starts + bm - 1) // bm
    last_block = torch.cumsum(blocks, 0)
    first_block = last_block - blocks
    b = torch.arange((rows + bm - 1) // bm + E, device=ends.device)
    group = torch.searchsorted(last_block, b, right=True)
    g = group.clamp(max=E - 1)
    row = starts[g] + (b - first_block[g]) * bm
    return group.to(torch.int32), row.to(torch.int32)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x (M, K) with its rows sorted by group, w (E, N, K), ends (E,) int32: each group's
    end row (ascending, the last at most M). The (M, N) result: row r of group e is
    x[r] @ w[e]^T, accumulated in fp32; rows past ends[-1] are 0. See `applies`."""
    M, K = x.shape
    E, N, _ = w.shape
    y = torch.zeros((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    bm = _block_rows(M, E)
    group, row = block_layout(ends, M, bm)
    args = (x, w, y, group, row, ends.to(torch.int32), N, E, x.stride(0), x.stride(1),
            w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1))
    with on_device(x.device):
        if tuned(x, K):
            _grouped_tuned[lambda meta: (group.numel(), triton.cdiv(N, meta["BN"]))](
                *args, K=K, BM=bm)
        else:
            bn, bk, stages = fixed_tiles(K, bm, x.element_size(), shared_memory(x.device))
            _grouped_kernel[(group.numel(), triton.cdiv(N, bn))](
                *args, K=K, BM=bm, BN=bn, BK=bk, num_warps=4, num_stages=stages)
    return y


def fixed_tiles(K: int, bm: int = 64, elem: int = 2, smem: int | None = None
                ) -> tuple[int, int, int]:
    """(BN, BK, pipeline stages) of an untuned call: deeper tiles for a deep K in a decode
    call (row blocks of 16, as measured) where the device's shared memory per block (`smem`,
    bytes; None: unknown) holds their stages."""
    bn, bk, stages = 64, 128, 4
    if K >= 4096 and bm <= 16 and smem is not None and \
            stages * (bm * bk + bk * bn) * elem <= smem:
        return bn, bk, stages
    return (64, 64, 3) if K >= 64 else (64, 32 if K >= 32 else 16, 3)


@functools.lru_cache(maxsize=None)
def shared_memory(device: torch.device) -> int | None:
    """Shared memory a block may use on a CUDA device (opt-in maximum), else None; read once
    per device (every MoE call asks)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", None)


def tuned(x: torch.Tensor, K: int) -> bool:
    """Whether the call's tiles are tuned: FLEXRUN_GROUPED_TUNE=1, on CUDA, K of at least 128
    (every config's depth tile fits); the interpreter runs the fixed tiles."""
    return x.is_cuda and K >= 128 and os.environ.get("FLEXRUN_GROUPED_TUNE", "0") == "1"
