"""Page-locked host tensors of exact size, for the long-lived homes of weights and KV cache.

PyTorch's pinned allocator rounds every block up to a power of two and caches freed blocks,
so tens of GB of pinned weights and KV slots can take up to twice their size in RAM (enough
to push a 60 GB model plus a 46 GB KV cache out of a 125 GiB host). Here a large buffer is a
plain host allocation registered with cudaHostRegister (page-locked in place, no rounding)
and unregistered when the tensor is collected. Small buffers, and any failure to register,
fall back to `pin_memory`.
"""
from __future__ import annotations

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


def pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """A page-locked host copy of t (exact size)."""
    out = pinned_empty(t.shape, t.dtype)
    out.copy_(t)
    return out
