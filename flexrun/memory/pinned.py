"""Page-locked host tensors of exact size, for the long-lived homes of weights and KV cache.

PyTorch's pinned allocator rounds every block up to a power of two and caches freed blocks,
so tens of GB of pinned weights and KV slots can take up to twice their size in RAM (enough
to push a 60 GB model plus a 46 GB KV cache out of a 125 GiB host). Here a large buffer is a
plain host allocation registered with cudaHostRegister (page-locked in place, no rounding)
and unregistered when the tensor is collected. Small buffers, and any failure to register,
fall back to `pin_memory`.
"""
from __future__ import annotations

import os
import weakref

import torch

_MIN_REGISTER = 1 << 20


def _unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:       # interpreter shutdown or the driver already gone
        pass


def pinned_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised page-locked host tensor of exactly shape x dtype."""
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes < _MIN_REGISTER:
        return t.pin_memory()
    try:
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
    except Exception:
        err = -1
    if int(err) != 0:
        return t.pin_memory()
    weakref.finalize(t, _unregister, t.data_ptr())
    return t


class PinnedArena:
    """Page-locked host memory for many long-lived tensors (a model's host-tier weights):
    chunks, each registered once, handed out back to back in 256-byte aligned pieces. A MoE
    model's experts are thousands of small matrices (Qwen3-30B-A3B: 18,432 of 3 MiB), each a
    cudaHostRegister call of its own without it. Chunks start at a sixteenth of `chunk` and
    double up to `chunk` (a few small tensors pin little); tensors of a sixteenth of `chunk`
    or more get a buffer of their own, so a full-size chunk's unused tail is under 1/16 of
    it. The chunks live as long as the arena."""
    ALIGN = 256

    def __init__(self, chunk: int = 256 << 20, empty=None):
        self.chunk = chunk
        self._empty = empty or pinned_empty
        self.chunks: list[torch.Tensor] = []
        self._used = self._size = 0         # of the last chunk

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised page-locked tensor of exactly shape x dtype."""
        n = torch.Size(shape).numel() * dtype.itemsize
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        if n >= self.chunk // 16:
            return self._empty(shape, dtype)
        start = -(-self._used // self.ALIGN) * self.ALIGN
        if start + n > self._size:
            self._size = min(self.chunk, max(2 * self._size, self.chunk // 16))
            self.chunks.append(self._empty((self._size,), torch.uint8))
            start = 0
        self._used = start + n
        return self.chunks[-1][start:start + n].view(dtype).view(shape)

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A page-locked host copy of t."""
        out = self.empty(t.shape, t.dtype)
        out.copy_(t)
        return out


H2D_CHUNK = int(os.environ.get("FLEXRUN_H2D_CHUNK_MB", "16")) << 20


def h2d_chunked(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to `device` on the current stream in pieces of H2D_CHUNK bytes.

    One big copy holds the host-to-device copy engine for its whole length (~7 ms for a
    400 MB matrix); the small activation and attention copies of the compute stream then
    wait behind it. Pieces let them in between."""
    nbytes_ = t.numel() * t.element_size()
    if nbytes_ <= H2D_CHUNK or not t.is_contiguous():
        return t.to(device, non_blocking=True)
    return copy_chunked(torch.empty(t.shape, dtype=t.dtype, device=device), t)


def copy_chunked(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Copy src into the contiguous device tensor dst on the current stream, in pieces of
    H2D_CHUNK bytes (see h2d_chunked); returns dst."""
    if src.numel() * src.element_size() <= H2D_CHUNK or not src.is_contiguous():
        return dst.copy_(src, non_blocking=True)
    d, s = dst.view(-1), src.view(-1)
    step = max(1, H2D_CHUNK // src.element_size())
    for i in range(0, s.numel(), step):
        d[i:i + step].copy_(s[i:i + step], non_blocking=True)
    return dst
