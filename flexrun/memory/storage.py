"""Tensors on tiers: the compute device ("gpu"), host memory ("cpu", pinned when asked) and disk.

A stored value is a torch.Tensor or a quant.Compressed (a dataclass of tensors); both move
between tiers through `map_parts`. Disk homes are files of a disk.DiskTier.
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext as _null
from concurrent.futures import Future
from typing import Callable

import torch

from flexrun.config import FlexrunError
from flexrun.memory.disk import DiskRef, DiskTier
from flexrun.memory.pinned import PinnedArena, copy_chunked, h2d_chunked, pinned_empty
from flexrun.memory.quant import join_rows

TIERS = ("gpu", "cpu", "disk")


_PART = (torch.Tensor, DiskRef)


def parts(value) -> list:
    """The tensor (or DiskRef) parts of a value: itself, or the fields of a dataclass."""
    if isinstance(value, _PART):
        return [value]
    return [getattr(value, f.name) for f in dataclasses.fields(value)
            if isinstance(getattr(value, f.name), _PART)]


def map_parts(value, fn: Callable):
    """Apply fn to a tensor, or to every tensor/DiskRef field of a dataclass (e.g. Compressed)."""
    if isinstance(value, _PART):
        return fn(value)
    changes = {f.name: fn(getattr(value, f.name)) for f in dataclasses.fields(value)
               if isinstance(getattr(value, f.name), _PART)}
    return dataclasses.replace(value, **changes)


def nbytes(value) -> int:
    return sum(p.nbytes if isinstance(p, DiskRef) else p.numel() * p.element_size()
               for p in parts(value))


def assign_tiers(sizes: list[int], percents: tuple[float, float, float]) -> list[int]:
    """Give each item (in order) a tier index so that the bytes per tier follow `percents`.

    Error diffusion: each item goes to the tier furthest below its share of the bytes so
    far, so every prefix (and thus every layer) is split as evenly as item sizes allow and the
    total is within one item of the target.
    """
    share = [p / 100.0 if p > 0 else None for p in percents]
    assigned = [0.0, 0.0, 0.0]
    total = 0.0
    out = []
    for s in sizes:             # (a search calls this for thousands of experts, many times)
        total += s
        t, best = 0, -math.inf
        for i in range(3):
            if share[i] is not None and share[i] * total - assigned[i] > best:
                t, best = i, share[i] * total - assigned[i]
        assigned[t] += s
        out.append(t)
    return out


def split_report(sizes: list[int], tiers: list[int]) -> dict[str, float]:
    """Actual percent of bytes per tier."""
    total = max(sum(sizes), 1)
    return {TIERS[t]: round(100.0 * sum(s for s, x in zip(sizes, tiers) if x == t) / total, 2)
            for t in range(3)}


# reserve_host's buffers: at most the pinned arena's chunk (a pin_memory fallback rounds a
# buffer up to a power of two)
RESERVE_SEGMENT = 256 << 20


class TieredStore:
    """Values (tensors or Compressed) kept on the tier chosen for each, fetched to compute."""

    def __init__(self, device: torch.device, disk: DiskTier | None, pin: bool):
        self.device = device
        self.disk = disk
        self.pin = pin and device.type == "cuda"
        self.pinned = PinnedArena() if self.pin else None     # host-tier weights
        self.homes: dict[str, tuple[str, object]] = {}
        self._host_slots: dict[str, torch.Tensor] = {}        # reserve_host's places
        self._host_bufs: list[torch.Tensor] = []    # their buffers (pinned: kept registered)

    def put(self, name: str, value, tier: str) -> None:
        if tier == "gpu":
            stored = map_parts(value, lambda t: t.to(self.device))
        elif tier == "cpu":
            slot = self._host_slots.pop(name, None)
            if slot is not None and isinstance(value, torch.Tensor) and \
                    value.shape == slot.shape and value.dtype == slot.dtype:
                self.homes[name] = (tier, slot.copy_(value))
                return

            def to_host(t):
                t = t.to("cpu")
                return self.pinned.copy(t) if self.pin else t
            stored = map_parts(value, to_host)
        else:
            if self.disk is None:
                raise FlexrunError("a policy puts data on disk but no --offload-dir is set")

            def to_disk(t):
                ref = DiskRef(self.disk.new_path(name), tuple(t.shape), t.dtype)
                self.disk.write(ref.path, t)
                return ref
            stored = map_parts(value, to_disk)
        self.homes[name] = (tier, stored)

    def reserve_host(self, names: list[str], shapes: list[tuple], dtype: torch.dtype) -> None:
        """Places back to back, in this order, for host-tier tensors about to be
        put (a put of that shape and dtype copies into its place): a run of them then crosses
        to the device in one copy (a MoE layer's host experts, engine/expert_staging.py);
        page-locked on a GPU run."""
        sizes = [torch.Size(s).numel() for s in shapes]
        segments: list[list[int]] = []  # buffers of at most RESERVE_SEGMENT bytes: a run
        total = 0                       # breaks at a buffer's edge
        for i, n in enumerate(sizes):
            if not segments or (total + n) * dtype.itemsize > RESERVE_SEGMENT:
                segments.append([])
                total = 0
            segments[-1].append(i)
            total += n
        for seg in segments:
            buf = (pinned_empty if self.pin else torch.empty)((sum(sizes[i] for i in seg),),
                                                              dtype=dtype)
            self._host_bufs.append(buf)
            for i, part in zip(seg, buf.split([sizes[i] for i in seg])):
                self._host_slots[names[i]] = part.view(shapes[i])

    def drop_reserved(self) -> None:
        """Forget the places no put took (a put of another shape or dtype, which the loader
        does not make: their bytes stay with their buffer's other places)."""
        self._host_slots.clear()

    def join(self, names: list[str]) -> bool:
        """Lay resident plain tensors out back to back in one buffer (each name keeps a view
        of its rows), so the model multiplies them as one matrix (models.common.linear_rows):
        one GEMM for q/k/v instead of three (4-bit weights: quant.join_rows). False, and
        nothing changes, unless all of `names` are on the compute device and alike but in
        their row count."""
        homes = [self.homes.get(n) for n in names]
        if any(h is None or h[0] != "gpu" for h in homes):
            return False
        ts = [h[1] for h in homes]
        if not all(isinstance(t, torch.Tensor) for t in ts):
            joined = join_rows(ts)
            for n, c in zip(names, joined or []):
                self.homes[n] = ("gpu", c)
            return joined is not None
        if len({(t.dtype, t.device, tuple(t.shape[1:])) for t in ts}) != 1:
            return False
        buf = torch.cat(ts)
        for n, view in zip(names, buf.split([t.shape[0] for t in ts])):
            self.homes[n] = ("gpu", view)
        return True

    def tier_of(self, name: str) -> str:
        return self.homes[name][0]

    def read_host(self, name: str, pinned: bool = False, arena: "Arena | None" = None,
                  mapped: bool = False):
        """The value in host memory: disk parts are mapped from the page cache when `mapped`
        (DiskTier.map_read), else read into `arena` when given, else into fresh (optionally
        pinned) tensors."""
        tier, stored = self.homes[name]
        if tier != "disk":
            return stored
        if mapped:
            return map_parts(stored, self.disk.map_read)

        def load(ref: DiskRef):
            out = arena.take(ref.shape, ref.dtype) if arena is not None else \
                torch.empty(ref.shape, dtype=ref.dtype, pin_memory=pinned)
            return self.disk.read_into(ref.path, out)
        return map_parts(stored, load)

    def disk_bytes(self, names) -> int:
        """Bytes of the disk parts of `names`, as an Arena lays them out."""
        return sum(Arena.aligned(p.nbytes) for n in names if self.homes[n][0] == "disk"
                   for p in parts(self.homes[n][1]))

    def fetch(self, name: str, stream=None, compute_stream=None, host_value=None):
        """The value on the compute device. Host->device copies go on `stream` when given;
        the copies are then marked as used by `compute_stream` for the caching allocator."""
        tier, stored = self.homes[name]
        if tier == "gpu":
            return stored
        host = host_value if host_value is not None else self.read_host(name)
        if self.device.type == "cpu":
            return host
        if stream is None:
            return map_parts(host, lambda t: t.to(self.device, non_blocking=True))

        def to_dev(t):
            d = h2d_chunked(t, self.device)
            d.record_stream(compute_stream)
            return d
        with torch.cuda.stream(stream):
            return map_parts(host, to_dev)

    def fetch_rows(self, hosts: list, stream=None, compute_stream=None) -> list | None:
        """Host values (plain tensors, or compressed weights part by part) copied to the
        device as consecutive row blocks of one buffer per part, each value a view of its
        rows: `models.common.linear_rows` then multiplies them as one matrix (a MoE expert's
        gate and up in one GEMM); None when their parts do not stack (other dtypes or
        trailing shapes). Copies go on `stream` when given, marked as used by
        `compute_stream`."""
        split = [parts(h) for h in hosts]
        if len({len(ps) for ps in split}) != 1 or any(
                p.dtype != q.dtype or p.shape[1:] != q.shape[1:] or p.dim() == 0
                for ps in zip(*split) for p, q in zip(ps, ps[1:])):
            return None
        ctx = torch.cuda.stream(stream) if stream is not None else _null()
        joined = []
        with ctx:
            for ps in zip(*split):
                buf = torch.empty((sum(p.shape[0] for p in ps),) + tuple(ps[0].shape[1:]),
                                  dtype=ps[0].dtype, device=self.device)
                views = buf.split([p.shape[0] for p in ps])
                for v, p in zip(views, ps):
                    copy_chunked(v, p)
                if compute_stream is not None:
                    buf.record_stream(compute_stream)
                joined.append(views)
        out = []
        for i, h in enumerate(hosts):
            it = iter(views[i] for views in joined)
            out.append(map_parts(h, lambda _t: next(it)))
        return out

    def fetch_ordered(self, host_values: dict, stream, compute_stream) -> dict:
        """Fetch several values (name -> host value, as read_host gives) with their device
        buffers taken from `compute_stream`'s pool, in its order: the copies on `stream` wait
        for the compute stream's work enqueued so far. Buffers freed by that work (the unit
        before last) are reused at once, so two streamed units are live on the device, not
        three, and one allocator pool serves the compute and the copies: a copy stream's own
        pool would stay reserved beside it. Call it from the thread that enqueues compute."""
        out, ready = self.reserve_ordered(host_values, compute_stream)
        return self.copy_ordered(out, ready, host_values, stream)

    def reserve_ordered(self, names, compute_stream) -> tuple[dict, object]:
        """fetch_ordered's first half, before any read: device buffers for `names` (shaped as
        stored) from `compute_stream`'s pool, and an event recorded there after them (None
        when all are on the device already). Call it from the thread that enqueues compute;
        copy_ordered may then run on another (an I/O thread, once its disk reads are in)."""
        out, off = {}, False
        with torch.cuda.stream(compute_stream):
            for name in names:
                tier, stored = self.homes[name]
                if tier == "gpu":
                    out[name] = stored
                    continue
                out[name] = map_parts(stored, lambda t: torch.empty(t.shape, dtype=t.dtype,
                                                                    device=self.device))
                off = True
        if not off:
            return out, None
        ready = torch.cuda.Event()
        ready.record(compute_stream)
        return out, ready

    def copy_ordered(self, out: dict, ready, host_values: dict, stream) -> dict:
        """fetch_ordered's second half: the host values copied on `stream` into the buffers
        reserve_ordered gave, once the compute stream has passed `ready`."""
        copies = [c for name, host in host_values.items() if self.homes[name][0] != "gpu"
                  for c in zip(parts(out[name]), parts(host))]
        if copies:
            stream.wait_event(ready)
            with torch.cuda.stream(stream):
                for dst, src in copies:
                    copy_chunked(dst, src)
        return out

    def bytes_per_tier(self) -> dict[str, int]:
        out = {t: 0 for t in TIERS}
        for tier, stored in self.homes.values():
            out[tier] += nbytes(stored)
        return out


class Arena:
    """A reusable host buffer that one unit's disk reads are laid out in, one after another.

    Reading into fresh tensors costs first-touch page faults (large tensors are new mappings:
    2.3 GB/s against 17 GB/s into a reused buffer on the 2-core machine's page cache)."""
    ALIGN = 64

    def __init__(self):
        self.buf: torch.Tensor | None = None
        self.used = 0

    @classmethod
    def aligned(cls, n: int) -> int:
        return -(-n // cls.ALIGN) * cls.ALIGN

    def reset(self, nbytes: int) -> "Arena":
        """Start a new layout of up to nbytes (the previous one must be out of use)."""
        if self.buf is None or self.buf.numel() < nbytes:
            self.buf = None
            self.buf = torch.empty(nbytes, dtype=torch.uint8)
        self.used = 0
        return self

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        n = torch.Size(shape).numel() * dtype.itemsize
        out = self.buf[self.used:self.used + n].view(dtype).view(shape)
        self.used += self.aligned(n)
        return out


def new_future(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f
