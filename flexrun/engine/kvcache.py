"""KV cache homes: one slot per (layer, GPU batch).

Slots read and write in attention layout (b, kv_heads, T, hd). Where the cache is used in
place (compute device, or host memory with CPU attention) it is stored batch-major, so each
head's keys are contiguous for attention; where prefixes are shipped (host memory to GPU,
disk) it is stored time-major (T, b, kv_heads, hd), so every prefix and every appended step
is one contiguous range.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Mapping

import torch

from flexrun.config import STORES_IN_FLIGHT
from flexrun.memory.pinned import pinned_empty
from flexrun.memory.disk import DiskTier, offload_error, private_open
from flexrun.engine.kvquant import CompressedKVSlot


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) for strided tensors whose last axis is contiguous: moved as 8-byte
    words where both allow it. A strided fp16 copy moves one 2-byte element per index
    computation; the prefill's K/V writes of S3 (OPT-6.7B, 32 x 512) took 0.19 ms each that
    way and 0.10 ms as int64 words (H100, bench/prefill_probe.py)."""
    if dst.dtype == src.dtype and _wide_ok(dst) and _wide_ok(src):
        dst, src = dst.view(torch.int64), src.view(torch.int64)
    dst.copy_(src)


def _wide_ok(t: torch.Tensor) -> bool:
    w = 8 // t.element_size() if t.element_size() in (1, 2, 4) else 0
    return (w > 1 and t.dim() > 0 and t.stride(-1) == 1 and t.shape[-1] % w == 0
            and t.storage_offset() % w == 0 and all(st % w == 0 for st in t.stride()[:-1]))


class StoreHold:
    """The device tensors that in-flight stores (GPU -> host copies on the store stream) read,
    held until their copy has run. record_stream would free them at once in the allocator's
    books but keep their memory from reuse until the store stream passes the free: the host
    enqueues a whole prefill ahead of the GPU, so every layer's K and V (views of its q/k/v
    output) stayed reserved, 19 GB beyond the allocated peak on S1. Held here they count as
    allocated, and their storage stays under STORES_IN_FLIGHT times the largest store's (a
    prefill's q/k/v output; plan/footprint.py counts as much): a store over it waits on the
    host for the oldest ones. A decode step's small stores fit beside each other."""

    def __init__(self):
        self.held: list[tuple] = []         # (event, tensors, storage bytes), oldest first
        self.cap = 0
        self._group: list | None = None

    @property
    def bytes(self) -> int:
        return sum(h[2] for h in self.held)

    @contextmanager
    def group(self):
        """The stores made inside are held as one (a compressed slot's planes of one write:
        the store stream runs them in order, so the last one's event covers all)."""
        if self._group is not None:
            yield
            return
        self._group = [None, []]
        try:
            yield
        finally:
            ev, tensors = self._group
            self._group = None
            if ev is not None:
                self.add(ev, tuple(tensors))

    def add(self, ev, tensors: tuple) -> None:
        if self._group is not None:
            self._group[0] = ev
            self._group[1] += tensors
            return
        n = storage_bytes(tensors)
        self.cap = max(self.cap, STORES_IN_FLIGHT * n)
        self.held = [h for h in self.held if not h[0].query()]
        while self.held and self.bytes + n > self.cap:
            self.held.pop(0)[0].synchronize()
        self.held.append((ev, tensors, n))

    def clear(self) -> None:
        for h in self.held:
            h[0].synchronize()
        self.held = []


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages under `tensors` (views of one output count once)."""
    seen = {}
    for t in tensors:
        if t is not None:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


class KVSlot:
    def __init__(self, tier: str, time_major: bool, shape: tuple[int, int, int, int],
                 dtype: torch.dtype, device: torch.device, disk: DiskTier | None, name: str,
                 store_stream=None, io=None, scratch: dict | None = None, plane: str = "",
                 zero: bool = False, hold: StoreHold | None = None):
        """scratch: reusable read buffers shared by the slots of a CPU run (disk reads into
        fresh tensors pay first-touch page faults); plane: which part of a slot this is;
        zero: zero-fill an in-memory slot (the static decode step of engine/graphs.py may
        attend over whole slots with the unused keys masked, and a masked NaN would still
        poison the sum)."""
        self.scratch, self.plane = scratch, plane
        self.tier, self.time_major, self.dtype, self.device = tier, time_major, dtype, device
        self.store_stream, self.io = store_stream, io
        self.hold = hold if hold is not None else StoreHold()
        self.pending: list = []                 # CUDA events / futures of in-flight stores
        self.max_len, self.rows = shape[2], shape[0]
        self.shape = shape                                       # (b, kv, T, hd)
        b, kv, T, hd = shape
        self.row_bytes = b * kv * hd * dtype.itemsize
        store_shape = (T, b, kv, hd) if time_major else shape
        if tier == "disk":
            self.paths = [disk.new_path(f"{name}.{x}") for x in "kv"]
            self.fds = []
            for p in self.paths:
                try:
                    self.fds.append(private_open(p, os.O_RDWR))
                    # sparse: positions not written yet read as zeros (a compressed slot
                    # reads its key codes' whole prefix while only the quantized part is set)
                    os.ftruncate(self.fds[-1], T * self.row_bytes)
                except OSError as e:
                    self.close()
                    raise offload_error(e, p) from None
            self.disk = disk
        else:
            where = device if tier == "gpu" else torch.device("cpu")
            pin = where.type == "cpu" and device.type == "cuda"
            make = torch.zeros if zero else torch.empty
            self.kv = [pinned_empty(store_shape, dtype) if pin else
                       make(store_shape, dtype=dtype, device=where) for _ in range(2)]

    @property
    def on_host(self) -> bool:
        return self.tier != "gpu" or self.device.type == "cpu"

    def write(self, k: torch.Tensor | None, v: torch.Tensor | None, t0: int,
              first: torch.Tensor | None = None) -> None:
        """Store k, v (b, kv_heads, s, hd) at time positions t0..t0+s; a part given as None
        is left as it is (a compressed slot's planes fill K and V codes at different times).
        first: each row's first real position (a compressed slot's key groups skip the
        padding before it); unused here."""
        s = (k if k is not None else v).shape[2]
        if self.tier == "disk":
            for fd, path, x in zip(self.fds, self.paths, (k, v)):
                if x is None:
                    continue
                data = x.permute(2, 0, 1, 3).to("cpu", self.dtype).contiguous()
                mv, pos = memoryview(data.view(torch.uint8).numpy().reshape(-1)), 0
                try:
                    while pos < len(mv):
                        pos += os.pwrite(fd, mv[pos:], t0 * self.row_bytes + pos)
                except OSError as e:
                    raise offload_error(e, path) from None
            return
        on_cuda = (k if k is not None else v).is_cuda
        if on_cuda and self.tier == "cpu" and self.store_stream is not None:
            return self._write_async(k, v, t0)
        if self.pending:    # an in-flight prefill store may cover these positions (padding)
            self._settle(on_cuda)
        for buf, x in zip(self.kv, (k, v)):
            if x is None:
                continue
            if self.time_major:
                copy_rows(buf[t0:t0 + s], x.permute(2, 0, 1, 3))
            else:
                copy_rows(buf[:, :, t0:t0 + s], x)

    def _write_async(self, k: torch.Tensor, v: torch.Tensor, t0: int) -> None:
        """GPU -> pinned host on the store stream; a strided (batch-major) destination is
        filled from a pinned stage by an I/O thread once the copy has landed."""
        x0 = k if k is not None else v
        s = x0.shape[2]
        self.store_stream.wait_stream(torch.cuda.current_stream(x0.device))
        with torch.cuda.stream(self.store_stream):
            for buf, x in zip(self.kv, (k, v)):
                if x is None:
                    continue
                if self.time_major:
                    buf[t0:t0 + s].copy_(x.permute(2, 0, 1, 3), non_blocking=True)
                elif t0 == 0 and x.shape[0] == buf.shape[0] and self.plane != "ring":
                    _d2h_rows_padded(buf, x)
                else:
                    stage = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
                    stage.copy_(x, non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(self.store_stream)
                    self.pending.append(self.io.submit(_land, ev, stage, buf[:, :, t0:t0 + s]))
            ev = torch.cuda.Event()
            ev.record(self.store_stream)
            self.pending.append(ev)
        self.hold.add(ev, (k, v))

    def _settle(self, on_device: bool) -> None:
        """Wait for in-flight stores: on the compute stream if read there, else on the host."""
        for p in self.pending:
            if isinstance(p, torch.cuda.Event):
                if on_device:
                    torch.cuda.current_stream().wait_event(p)
                else:
                    p.synchronize()
            else:
                p.result()
        self.pending = []

    def quant_planes(self, t_end: int, device: torch.device, pinned: bool = False) -> None:
        """A dense slot has no 4-bit planes (CompressedKVSlot.quant_planes): attention reads
        its K and V through read()."""
        return None

    def read(self, t_end: int, device: torch.device, pinned: bool = False):
        """(K, V) for positions [0, t_end) on `device`, (b, kv_heads, t_end, hd) each."""
        if self.pending:
            self._settle(device.type == "cuda")
        if self.tier == "disk":
            parts = [self._pread(fd, t_end, pinned, i) for i, fd in enumerate(self.fds)]
        elif self.time_major:
            parts = [buf[:t_end] for buf in self.kv]
        else:
            parts = [buf[:, :, :t_end] for buf in self.kv]
        if parts[0].device != device:
            parts = [x.to(device, non_blocking=True) for x in parts]
        if self.time_major or self.tier == "disk":
            parts = [x.permute(1, 2, 0, 3) for x in parts]
        return parts

    def _pread(self, fd: int, t_end: int, pinned: bool, part: int) -> torch.Tensor:
        b, kv, _, hd = self.shape
        if self.scratch is not None:        # read synchronously and used before the next read
            key = (self.plane, part, self.dtype, b, kv, hd)
            buf = self.scratch.get(key)
            if buf is None or buf.shape[0] < t_end:
                buf = self.scratch[key] = torch.empty((self.max_len, b, kv, hd),
                                                      dtype=self.dtype)
            t = buf[:t_end]
        else:
            t = torch.empty((t_end, b, kv, hd), dtype=self.dtype, pin_memory=pinned)
        mv = memoryview(t.view(torch.uint8).numpy().reshape(-1))
        pos = 0
        while pos < len(mv):
            n = os.preadv(fd, [mv[pos:]], pos)
            if n <= 0:
                raise OSError(f"short read from {self.paths[0].parent}")
            pos += n
        return t

    def close(self) -> None:
        if self.pending:
            self._settle(False)
        if self.tier == "disk":
            for fd in self.fds:
                os.close(fd)
            for p in self.paths:
                p.unlink(missing_ok=True)
            self.fds = []


_TILE = 32 << 20


def _d2h_rows_padded(buf: torch.Tensor, x: torch.Tensor) -> None:
    """Prefill store into a batch-major pinned slot (b, kv, T, hd) from x (b, kv, s, hd).

    Rows of the slot are contiguous in host memory, so GPU tiles of whole rows, padded to T
    on the device, go straight into them (the padding is overwritten by later decode steps
    before it is read): no pinned stage and no strided host copy."""
    b, kv, s, hd = x.shape
    T = buf.shape[2]
    rows = max(1, _TILE // (kv * T * hd * x.element_size()))
    for r0 in range(0, b, rows):
        r1 = min(b, r0 + rows)
        tile = torch.empty((r1 - r0, kv, T, hd), dtype=x.dtype, device=x.device)
        tile[:, :, :s].copy_(x[r0:r1])
        buf[r0:r1].copy_(tile, non_blocking=True)


def _land(ev, stage: torch.Tensor, dst: torch.Tensor) -> None:
    ev.synchronize()
    dst.copy_(stage)


class KVCache:
    """All slots of a block; layer j's slots live on the tier given by `layer_tiers[j]`."""

    def __init__(self, layer_tiers: Mapping[int, str], device: torch.device, dtype: torch.dtype,
                 disk: DiskTier | None, num_kv_heads: int, head_dim: int, cpu_attention: bool,
                 store_stream=None, io=None, quant: tuple | None = None,
                 zero_fill: bool = False, gpu_batches: int = 0):
        """quant: (bits, group, scheme, window, sink) to store K and V compressed
        (compress_cache, engine/kvquant.py), else None;
        zero_fill: zero the compute-device slots (for the static decode step);
        gpu_batches: the first GPU batches whose slots are on the device in every layer."""
        self.layer_tiers, self.device, self.dtype = layer_tiers, device, dtype
        self.gpu_batches = gpu_batches
        self.quant, self.zero_fill = quant, zero_fill
        self.disk, self.kv_heads, self.head_dim = disk, num_kv_heads, head_dim
        self.cpu_attention = cpu_attention
        self.store_stream, self.io = store_stream, io
        self.slots: dict[tuple[int, int], KVSlot] = {}
        self.hold = StoreHold()         # the stores in flight, shared by every slot
        # a CPU run attends right after reading: disk reads can share reused buffers
        self.scratch: dict | None = {} if device.type == "cpu" else None

    def _time_major(self, tier: str) -> bool:
        if tier == "disk":
            return True
        used_in_place = tier == "gpu" or self.device.type == "cpu" or self.cpu_attention
        return not used_in_place

    def slot(self, layer: int, batch: int, max_len: int, rows: int) -> KVSlot:
        """The slot for (layer, batch), (re)allocated when too small for this block, and on a
        CPU run also when far too large: its decode attention reads whole slots (blocks run
        longest first, so a later block would attend over an earlier block's length)."""
        s = self.slots.get((layer, batch))
        oversized = self.device.type == "cpu" and s is not None and \
            s.max_len > max_len + max(16, max_len // 4)
        if s is None or s.max_len < max_len or s.rows != rows or oversized:
            if s is not None:
                s.close()
                del self.slots[(layer, batch)]      # freed before its successor is made
            tier = "gpu" if batch < self.gpu_batches else self.layer_tiers[layer]
            name = f"kv-l{layer}-b{batch}"
            shape = (rows, self.kv_heads, max_len, self.head_dim)

            def make(shape_, dtype, part=""):
                return KVSlot(tier, self._time_major(tier), shape_, dtype, self.device,
                              self.disk, name + (f".{part}" if part else ""),
                              self.store_stream, self.io, self.scratch, part,
                              self.zero_fill and tier == "gpu", self.hold)
            if self.quant is None:
                s = make(shape, self.dtype)
            else:
                s = CompressedKVSlot(make, shape, self.dtype, *self.quant)
            self.slots[(layer, batch)] = s
        return s

    def close(self) -> None:
        for s in self.slots.values():
            s.close()
        self.slots.clear()
        self.hold.clear()
