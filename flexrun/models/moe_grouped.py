"""Grouped GEMMs of a MoE layer's experts: every routed (token, slot) pair in two GEMMs
(gate/up, then down) over the pairs sorted by expert, from the experts stacked back to back."""
from __future__ import annotations

import os
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from flexrun.kernels import grouped as grouped_triton
from flexrun.kernels.grouped4 import Experts4, grouped4_mm, stack4
from flexrun.memory.quant import Compressed
from flexrun.models.common import joined

Activation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def silu_mul(g: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(g, inplace=True).mul_(up)


# the grouped path holds every (token, slot) pair's gate/up output at once: larger calls (long
# prefills) run the per-expert loop, whose workspace is one expert's tokens at a time
GROUPED_MAX_BYTES = 256 << 20
_STACKED: dict[tuple, tuple[torch.Tensor, torch.Tensor] | None] = {}


def stacked_experts(w: dict, E: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """((E, 2 ffn, hidden) gate/up, (E, hidden, ffn) down) when a layer's experts lie back to
    back in two buffers (LlamaModel.JOINED: every expert resident on the device, plain
    tensors) with the 16-byte strides and alignment grouped GEMMs need, as views; None
    otherwise. Remembered per buffer pair (checking E tensors each call costs ~1 ms)."""
    first, last = w.get("experts.0.gate.weight"), w.get(f"experts.{E - 1}.down.weight")
    if isinstance(first, Compressed) and isinstance(last, Compressed):     # 4-bit experts
        first, last = first.data, last.data
    if not (isinstance(first, torch.Tensor) and isinstance(last, torch.Tensor)):
        return None
    key = (first.device, first.data_ptr(), last.data_ptr(), E, tuple(first.shape))
    if key not in _STACKED:
        if len(_STACKED) > 4096:
            _STACKED.clear()
        stacked = _stack(w, E)
        if stacked is None and first.is_cuda and torch.cuda.is_current_stream_capturing():
            return None         # (4-bit stacks are not checked inside a capture: not kept)
        _STACKED[key] = stacked
    return _STACKED[key]


def _stack(w: dict, E: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    gu = [w.get(f"experts.{e}.{p}.weight") for e in range(E) for p in ("gate", "up")]
    down = [w.get(f"experts.{e}.down.weight") for e in range(E)]
    if all(isinstance(c, Compressed) and c.dtype == torch.float16 for c in gu + down):
        a, b = joined(gu), joined(down)         # 4-bit: the grouped 4-bit kernel's stacks
        if a is None or b is None:
            return None
        pair = (stack4(a, E), stack4(b, E))
        return None if None in pair else pair
    if any(not isinstance(t, torch.Tensor) for t in gu + down):
        return None
    a, b = joined(gu), joined(down)
    if a is None or b is None:
        return None
    if not rows_aligned(a.dtype, a.shape[-1], b.shape[-1]) or a.data_ptr() % 16 \
            or b.data_ptr() % 16:
        return None
    return a.view(E, -1, a.shape[-1]), b.view(E, -1, b.shape[-1])


def stacked_biases(w: dict, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """((E, 2 ffn) gate/up, (E, hidden) down) biases of a layer's experts, as views where
    they lie back to back (LlamaModel.JOINED joins them with the weights: remembered per
    buffer, as stacked_experts), else stacked afresh."""
    first, last = w["experts.0.gate.bias"], w[f"experts.{E - 1}.down.bias"]
    key = (first.device, first.data_ptr(), last.data_ptr(), E, "bias")
    if key in _STACKED:
        return _STACKED[key]
    gu = [w[f"experts.{e}.{p}.bias"] for e in range(E) for p in ("gate", "up")]
    down = [w[f"experts.{e}.down.bias"] for e in range(E)]
    a, b = joined(gu), joined(down)
    if a is not None and b is not None:         # views of the live buffers: kept
        _STACKED[key] = a.view(E, -1), b.view(E, -1)
        return _STACKED[key]
    return (torch.cat(gu) if a is None else a).view(E, -1), \
        (torch.cat(down) if b is None else b).view(E, -1)


def rows_aligned(dtype: torch.dtype, hidden: int, ffn: int) -> bool:
    """Whether rows of `hidden` and of `ffn` values are whole 16-byte units (grouped GEMMs
    need their strides so)."""
    step = 16 // dtype.itemsize
    return hidden % step == 0 and ffn % step == 0


_GROUPED: dict[tuple, bool] = {}
_TRITON_OFF: set[tuple] = set()     # (device, dtype) where the Triton kernel failed its check


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether grouped_mm runs on this device and dtype and agrees with per-group matmuls
    (checked once on a small case: the Triton kernel where it applies, torch's grouped GEMM
    if that fails); FLEXRUN_GROUPED_MM=0 turns it off."""
    key = _key(device, dtype)
    if key not in _GROUPED:
        ok = os.environ.get("FLEXRUN_GROUPED_MM", "1") != "0" and hasattr(torch, "_grouped_mm")
        if ok and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False                # probe outside a capture (the eager steps come first)
        if ok:
            ok = _agrees(device, dtype)
            probe = torch.empty(1, 1, dtype=dtype, device=device)
            if not ok and device.type == "cuda" and _triton_grouped(probe, probe[None]):
                _TRITON_OFF.add(key)        # the Triton kernel was tried: torch's instead
                ok = _agrees(device, dtype)
                if ok:
                    print(f"flexrun: the Triton grouped GEMM failed its check on {device} "
                          f"({dtype}): torch's grouped GEMM runs instead", file=sys.stderr)
        _GROUPED[key] = ok
    return _GROUPED[key]


def _key(device: torch.device, dtype: torch.dtype) -> tuple:
    index = device.index if device.index is not None or device.type != "cuda" else \
        torch.cuda.current_device()
    return device.type, index, dtype


def _agrees(device: torch.device, dtype: torch.dtype) -> bool:
    """grouped_mm against per-group matmuls at row counts that take each of the Triton
    kernel's row blocks (16, 32, 64), several K blocks deep."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        for rows in (40, 100, 200):
            a = (torch.randn(rows, 160, generator=g, device=device) / 8).to(dtype)
            b = (torch.randn(3, 80, 160, generator=g, device=device) / 8).to(dtype)
            cut = rows // 5
            offs = torch.tensor([cut, cut, rows], dtype=torch.int32, device=device)
            y = grouped_mm(a, b, offs)
            ref = torch.cat([a[:cut].float() @ b[0].float().T, a[cut:].float() @ b[2].float().T])
            if not torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2):
                return False
        return True
    except Exception:       # (a kernel that does not compile or launch here: not used)
        return False


def _cutlass_grouped(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm has a kernel of its own here (bf16 on sm90 / sm100); elsewhere its
    fallback copies the group offsets to the host and loops over the groups."""
    return (device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device)[0] in (9, 10))


def _triton_grouped(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.is_cuda and not _cutlass_grouped(x.device, x.dtype) and \
        _key(x.device, x.dtype) not in _TRITON_OFF and \
        grouped_triton.applies(x, w)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Row r of group e (x's rows sorted by group, ends: each group's end row, int32) times
    w[e]^T, w (E, N, K): torch's CUTLASS kernel where it has one, the Triton kernel on other
    CUDA cases (kernels/grouped.py: no host sync), torch's grouped GEMM on the CPU."""
    if isinstance(w, Experts4):         # 4-bit experts (kernels/grouped4.py)
        return grouped4_mm(x, w, ends)
    if _triton_grouped(x, w):
        return grouped_triton.grouped_mm(x, w, ends)
    return torch._grouped_mm(x, w.transpose(1, 2), offs=ends)


def grouped_ready(stacked, x: torch.Tensor, capturing: bool) -> bool:
    """Whether the stacked experts' grouped GEMMs run for x now: 4-bit stacks on fp16 inputs
    outside a CUDA graph capture (their Triton kernel is not captured), plain ones where
    grouped_mm works (or, capturing, where it is capturable)."""
    if stacked is None:
        return False
    if isinstance(stacked[0], Experts4):
        return not capturing and x.dtype == torch.float16
    return grouped_mm_capturable(x.device, x.dtype) if capturing \
        else grouped_mm_works(x.device, x.dtype)


def grouped_mm_capturable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether grouped GEMMs go into a CUDA graph: torch's CUTLASS kernel, which runs without
    a host sync (the Triton kernel is sync-free too, but is not captured: it compiles on its
    first launch of each shape, and the graphs have not been checked with it on a GPU)."""
    if device.type != "cuda":
        return grouped_mm_works(device, dtype)
    return _cutlass_grouped(device, dtype) and grouped_mm_works(device, dtype)


def grouped_experts(x2: torch.Tensor, stacked: tuple[torch.Tensor, torch.Tensor],
                    weight: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor,
                    out: torch.Tensor, act: Activation | None = None,
                    biases: tuple[torch.Tensor, torch.Tensor] | None = None,
                    scale_input: bool = False) -> None:
    """Every routed expert in two grouped GEMMs (gate/up, then down) over the (token, slot)
    pairs sorted by expert: no loop over experts and no host sync (so a CUDA graph can
    capture it), the work of the routed tokens only. act / biases: the experts' own
    (gpt-oss), each pair's bias rows picked by its expert."""
    W1, W2 = stacked
    T, k = idx.shape
    idx, slot = idx.sort(-1)            # each token's experts in ascending order
    weight = weight.gather(1, slot)
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    rows_bias = None
    if biases is not None:
        B1, B2 = biases
        eid = flat[order]               # the pairs' experts, sorted as their rows
        rows_bias = (B1[eid], B2[eid])
    xs, pair_w = x2[order // k], weight.reshape(-1)[order, None]
    if scale_input:                     # Llama 4: the weights scale the experts' inputs
        xs, pair_w = xs * pair_w.to(xs.dtype), None
    y = grouped_mlp(xs, W1, W2, counts.cumsum(0).to(torch.int32), act, rows_bias)
    y = (y if pair_w is None else y * pair_w).to(out.dtype)
    ys = torch.empty_like(y).index_copy_(0, order, y).view(T, k, -1)
    for j in range(k):      # expert order per token, as the per-expert loop adds (no atomics)
        out.add_(ys[:, j])


def grouped_mlp(xs: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, offs: torch.Tensor,
                act: Activation | None = None,
                rows_bias: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) of every expert over its rows of xs (sorted by expert,
    expert e's rows ending at offs[e], int32) in two grouped GEMMs; W1 (E, 2 ffn, hidden)
    holds each expert's gate then up, W2 (E, hidden, ffn) its down. act: another gated
    activation; rows_bias: each row's gate/up and down biases ((rows, 2 ffn), (rows, hidden))."""
    h = grouped_mm(xs, W1, offs)
    if rows_bias is not None:
        h = h + rows_bias[0].to(h.dtype)
    g, up = h.chunk(2, -1)
    y = grouped_mm(F.silu(g).mul_(up) if act in (None, silu_mul) else act(g, up).contiguous(),
                   W2, offs)
    return y if rows_bias is None else y + rows_bias[1].to(y.dtype)


