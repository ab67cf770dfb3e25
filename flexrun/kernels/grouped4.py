"""Grouped GEMMs over 4-bit experts in one Triton kernel: y[rows of group e] = x[rows of
group e] @ dequant(W[e])^T, W's codes and group mins / scales read as they are stored.

4-bit experts otherwise run expert by expert: the call waits on the host for its routing
counts, then launches a gather, two or three fused 4-bit matmuls, the activation and the
weighting per routed expert (S6q's H100 trace: 3.1 ms per 128-row call over Mixtral's 8
experts, launches rather than bytes). Here a layer's experts go in two launches per call
(gate/up, then down) with the row blocks laid out on the device (kernels/grouped.block_layout):
no host sync. Each expert's codes and group mins / scales are found through a table of their
addresses, so resident experts and copies held for the block serve as they lie, with no
staging copy. Each weight tile is dequantized in registers as the fused matmul does (fp32
q * scale + min, rounded to fp16), then multiplied in fp32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:             # CPU-only installs: the per-expert route is used
    triton = None

from flexrun.kernels.dequant import on_device
from flexrun.kernels.grouped import _block_rows, block_layout
if triton is not None:
    from flexrun.kernels.dequant import w4_tile
    from flexrun.kernels.grouped import row_block

GROUPS = (32, 64, 128)          # group sizes the kernel handles (its depth tile, 128, holds
#                                 whole groups)


@dataclass
class Experts4:
    """E experts' 4-bit weights of one kind (gate and up joined, or down), each (N, K) with
    its codes grouped along K, wherever each lies in device memory: tables (on the device) of
    the addresses of each expert's (N, K/2) uint8 codes and (N, K/G) fp16 mins and scales.
    `keep` holds what the addresses point into (and the pinned table the copy reads)."""
    table: torch.Tensor         # (3, E) int64: codes, mins, scales addresses
    N: int
    K: int
    group_size: int
    keep: tuple = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.table.shape[1], self.N, self.K


def _layout(c) -> bool:
    return (c.bits == 4 and c.pad == 0 and c.dim == 1 and len(c.shape) == 2
            and c.group_size in GROUPS and c.shape[1] % c.group_size == 0
            and c.dtype == torch.float16)


def _fits(c) -> bool:
    return (_layout(c) and (c.data.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
            and all(t.is_contiguous() for t in (c.data, c.mins, c.scales)))


def handles(c, device: torch.device) -> bool:
    """Whether the kernel runs weights compressed as `c` (wherever `c` lies now) once they
    are on `device`."""
    return (enabled() and _layout(c)
            and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
            and works(device))


def enabled() -> bool:
    """Whether the grouped 4-bit kernel may run (Triton present; FLEXRUN_TRITON_GROUPED=0
    turns the grouped kernels off)."""
    return triton is not None and os.environ.get("FLEXRUN_TRITON_GROUPED", "1") == "1"


_WORKS: dict[tuple, bool] = {}


@dataclass
class _Probe:
    """A 40 x 128 weight as quant.Compressed stores it (groups of 64), for `works`."""
    data: torch.Tensor
    mins: torch.Tensor
    scales: torch.Tensor
    shape: tuple = (40, 128)
    group_size: int = 64


def works(device: torch.device) -> bool:
    """Whether the kernel compiles, runs and agrees with dequantized per-expert matmuls on
    `device` (checked once, on a small case; never inside a CUDA graph capture). A failed
    check leaves MoE calls on the per-expert route, with one line on stderr."""
    key = (device.type, device.index)
    if key in _WORKS:
        return _WORKS[key]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    ok = False
    try:
        g = torch.Generator().manual_seed(0)
        ws, dense = [], []
        for _ in range(2):      # 40 x 128 weights, groups of 64: codes, fp16 mins and scales
            codes = torch.randint(0, 16, (40, 128), generator=g, dtype=torch.uint8)
            mins = (torch.randn(40, 2, 1, generator=g) * 0.1).half()
            scales = (torch.rand(40, 2, 1, generator=g) * 0.02).half()
            dense.append((codes.view(40, 2, 64).float() * scales.float() + mins.float())
                         .half().float().view(40, 128))
            packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(-1)
            ws.append(_Probe(packed.to(device), mins.to(device), scales.to(device)))
        x = torch.randn(21, 128, generator=g).half().to(device)
        ends = torch.tensor([5, 21], dtype=torch.int32, device=device)
        y = grouped4_mm(x, _tables(ws), ends).float().cpu()
        xf = x.float().cpu()
        ref = torch.cat([xf[:5] @ dense[0].T, xf[5:] @ dense[1].T])
        ok = bool(torch.allclose(y, ref, rtol=2e-2, atol=2e-2))
    except Exception as e:     # (a kernel that does not compile or launch here: not used)
        import sys
        print(f"flexrun: the grouped 4-bit kernel failed on {device} ({type(e).__name__}): "
              "4-bit experts run expert by expert", file=sys.stderr)
    _WORKS[key] = ok
    return ok


def _table(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    host = torch.tensor(rows, dtype=torch.int64)
    if device.type != "cuda":
        return host, host
    host = host.pin_memory()            # an asynchronous copy: no wait for the stream
    return host.to(device, non_blocking=True), host


def experts4(ws: list) -> Experts4 | None:
    """The address tables of experts' 4-bit weights (quant.Compressed, alike in shape), each
    stored in one buffer per part; None where the kernel does not handle them."""
    if not ws or not enabled() or not all(_fits(c) and c.shape == ws[0].shape and
                                          c.group_size == ws[0].group_size for c in ws) \
            or not works(ws[0].data.device):
        return None
    return _tables(ws)


def _tables(ws: list) -> Experts4:
    rows = [[c.data.data_ptr() for c in ws], [c.mins.data_ptr() for c in ws],
            [c.scales.data_ptr() for c in ws]]
    table, host = _table(rows, ws[0].data.device)
    return Experts4(table, ws[0].shape[0], ws[0].shape[1], ws[0].group_size, (ws, host))


def stack4(joined, E: int) -> Experts4 | None:
    """The tables of E experts' weights compressed and joined row after row in one buffer
    per part (quant.Compressed of shape (E * N, K), TieredStore.join); None where the kernel
    does not handle them."""
    c = joined
    if not (enabled() and _fits(c) and c.shape[0] % E == 0 and works(c.data.device)):
        return None
    n, k = c.shape[0] // E, c.shape[1]
    per = [c.data.numel() // E, c.mins.numel() // E, c.scales.numel() // E]
    rows = [[t.data_ptr() + e * m * t.element_size() for e in range(E)]
            for t, m in zip((c.data, c.mins, c.scales), per)]
    table, host = _table(rows, c.data.device)
    return Experts4(table, n, k, c.group_size, (c, host))


if triton is not None:
    @triton.jit
    def _grouped4_kernel(X, TABLE, Y, BLOCK_GROUP, BLOCK_ROW, ENDS, N, E,
                         sxm, sym, K: tl.constexpr, G: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr, BK: tl.constexpr):
        e, rm, rows = row_block(BLOCK_GROUP, BLOCK_ROW, ENDS, E, BM)
        if e >= E:                      # past the last group's blocks
            return
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        cols = rn < N
        rk = tl.arange(0, BK)
        HALF_K: tl.constexpr = K // 2
        NG: tl.constexpr = K // G
        codes = tl.load(TABLE + e).to(tl.pointer_type(tl.uint8))
        MINS = tl.load(TABLE + E + e).to(tl.pointer_type(tl.float16))
        SCALES = tl.load(TABLE + 2 * E + e).to(tl.pointer_type(tl.float16))
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):      # K constexpr: one compile per width
            w = w4_tile(codes, MINS, SCALES, rn.to(tl.int64), cols, k0, HALF_K, NG, G, BN,
                        BK)
            a = tl.load(X + rm[:, None].to(tl.int64) * sxm + (k0 + rk)[None, :],
                        mask=rows[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(w), acc)
        tl.store(Y + rm[:, None].to(tl.int64) * sym + rn[None, :], acc.to(Y.dtype.element_ty),
                 mask=rows[:, None] & cols[None, :])


def grouped4_mm(x: torch.Tensor, w: Experts4, ends: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp16 with its rows sorted by group, w the experts' 4-bit weights (E, N, K),
    ends (E,) int32: each group's end row. The (M, N) result: row r of group e is
    x[r] @ dequant(w[e])^T, accumulated in fp32; rows past ends[-1] are 0."""
    M, K = x.shape
    E, N, _ = w.shape
    y = torch.zeros((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    x = x if x.stride(1) == 1 else x.contiguous()
    bm = _block_rows(M, E)
    group, row = block_layout(ends, M, bm)
    bn = 32 if N < 4096 else 64
    with on_device(x.device):
        _grouped4_kernel[(group.numel(), triton.cdiv(N, bn))](
            x, w.table, y, group, row, ends.to(torch.int32), N, E,
            x.stride(0), y.stride(0), K=K, G=w.group_size, BM=bm, BN=bn, BK=128,
            num_warps=4, num_stages=3)
    return y
