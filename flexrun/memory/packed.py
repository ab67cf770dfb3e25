"""bf16 linear weights pre-packed in oneDNN's blocked layout, for CPU runs.

oneDNN reorders a plain (out, in) bf16 weight into its blocked layout on every GEMM. At
decode sizes that reorder costs about as much as the multiply: 16 rows x (8192 x 2048) took
2.75 ms plain against 1.97 ms pre-packed (2 cores, AVX512-BF16). A CPU bf16 run therefore
stores its layers' linear weights already packed, as plain bytes on any tier (a disk file is
mapped straight from the page cache), and multiplies them through a oneDNN tensor made over
those bytes at each use: no copy, and the same bits as F.linear (checked once per process
by `available`, which turns packing off when they differ or the private ops are missing).
FLEXRUN_PACK_WEIGHTS=0 turns it off.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
from functools import lru_cache
from pathlib import Path

import torch

from flexrun.memory.disk import DiskRef

ENABLED = os.environ.get("FLEXRUN_PACK_WEIGHTS", "1") != "0"


@dataclasses.dataclass
class Packed:
    """A linear weight of logical `shape` (out, in) as oneDNN blocked-layout bytes.

    `data` (a uint8 tensor, or a DiskRef while on disk) is the only part the tiers move
    (storage.map_parts); `layout` is oneDNN's serialized memory descriptor."""
    data: torch.Tensor | DiskRef
    shape: tuple[int, int]
    layout: bytes

    def linear(self, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T + b, bit for bit as F.linear with the plain weight."""
        w = _over(self.data, self.shape, self.layout)
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")

    def dense(self) -> torch.Tensor:
        """The plain (out, in) weight (a copy)."""
        return _over(self.data, self.shape, self.layout).to_dense()


def applies(device: torch.device, dtype: torch.dtype, compress_weight: bool) -> bool:
    """Whether a run's linear weights are stored packed: bf16 CPU runs without 4-bit
    weights, where oneDNN computes bf16 and the self-check passes."""
    return (ENABLED and device.type == "cpu" and dtype == torch.bfloat16
            and not compress_weight and available())


def pack(w: torch.Tensor, rows: int) -> Packed:
    """The 2-D bf16 weight w in oneDNN's layout for GEMMs of about `rows` rows."""
    p = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)
    n = torch.ops.mkldnn._nbytes(p)
    data = torch.empty(n, dtype=torch.uint8)
    ctypes.memmove(data.data_ptr(), torch.ops.mkldnn.data_ptr(p), n)
    layout = bytes(torch.ops.mkldnn._get_mkldnn_serialized_md(p).tolist())
    return Packed(data, (int(w.shape[0]), int(w.shape[1])), layout)


class _Shim:
    """libtorch's C entry point that makes a oneDNN tensor over caller-owned bytes (the one
    AOTInductor loads packed constants with), and the handle-to-Tensor conversion."""

    def __init__(self):
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        i32 = ctypes.c_int32
        for name in ("aoti_torch_dtype_bfloat16", "aoti_torch_layout__mkldnn",
                     "aoti_torch_device_type_cpu"):
            getattr(lib, name).restype = i32
        self.dtype = i32(lib.aoti_torch_dtype_bfloat16())
        self.layout = i32(lib.aoti_torch_layout__mkldnn())
        self.device = i32(lib.aoti_torch_device_type_cpu())
        self.from_blob = lib.aoti_torch_create_tensor_from_blob_v2
        self.from_blob.restype = i32
        capsule = ctypes.pythonapi.PyCapsule_New
        capsule.restype = ctypes.py_object
        capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        self.capsule = capsule


@lru_cache(maxsize=None)
def _shim() -> _Shim:
    return _Shim()


def _over(data: torch.Tensor, shape: tuple[int, int], layout: bytes) -> torch.Tensor:
    """A oneDNN tensor over data's bytes (it does not own them: data must outlive it)."""
    s = _shim()
    handle = ctypes.c_void_p()
    sizes = (ctypes.c_int64 * 2)(*shape)
    strides = (ctypes.c_int64 * 2)(shape[1], 1)
    rc = s.from_blob(ctypes.c_void_p(data.data_ptr()), ctypes.c_int64(2), sizes, strides,
                     ctypes.c_int64(0), s.dtype, s.device, ctypes.c_int32(0),
                     ctypes.byref(handle), s.layout, ctypes.c_char_p(layout),
                     ctypes.c_int64(len(layout)))
    if rc != 0:
        raise RuntimeError("aoti_torch_create_tensor_from_blob_v2 failed")
    return torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr(
        s.capsule(handle.value, None, None))


@lru_cache(maxsize=None)
def available() -> bool:
    """Whether packed weights work here and give F.linear's bits: oneDNN with bf16, the
    private ops present, and a packed GEMM equal to the plain one at 1, 5 and 16 rows (3-D
    and strided inputs too) on odd shapes."""
    try:
        if not (torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        g = torch.Generator().manual_seed(0)
        for n, k in ((96, 64), (257, 129)):
            w = torch.randn(n, k, generator=g).bfloat16()
            b = torch.randn(n, generator=g).bfloat16()
            p = pack(w, 16)
            xs = [torch.randn(m, k, generator=g).bfloat16() for m in (1, 5, 16)]
            xs += [torch.randn(2, 3, k, generator=g).bfloat16(),
                   torch.randn(4, 2 * k, generator=g).bfloat16()[:, ::2]]
            for x in xs:
                if not torch.equal(p.linear(x, b), torch.nn.functional.linear(x, w, b)):
                    return False
                if not torch.equal(p.linear(x), torch.nn.functional.linear(x, w)):
                    return False
        return True
    except Exception:       # a torch without these private ops or the shim: plain weights
        return False
