"""Tensors on tiers: the compute device ("gpu"), host memory ("cpu", pinned when asked) and disk.

A stored value is a torch.Tensor or a quant.Compressed (a dataclass of tensors); both move
between tiers through `map_tensors`. Disk homes are one file per tensor part, read and
written by a thread pool in large sequential chunks.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import math
import mmap
import os
import re
import shutil
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from flexrun.config import FlexrunError
from flexrun.memory.pinned import h2d_chunked, pinned_copy
from flexrun.memory.quant import join_rows

TIERS = ("gpu", "cpu", "disk")
MADV_POPULATE_READ = 22     # Linux >= 5.14: map a range's pages now (mmap lacks the name)
# CPU runs compute on disk weights through mappings of the page cache (DiskTier.map_read);
# FLEXRUN_MAP_DISK=0 reads them into reused buffers instead (the GPU path always does)
MAP_DISK = os.environ.get("FLEXRUN_MAP_DISK", "1") != "0"
MAP_MIN = 1 << 20       # smaller parts are read: 9 against 34 us (3 KB), 101 against 51 (2.4 MB)


@dataclasses.dataclass
class DiskRef:
    """A tensor part stored on disk."""
    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


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


_RUN_DIR = re.compile(r"flexrun-run-(\d+)-[0-9a-f]+")


def remove_stale_runs(root: Path) -> list[Path]:
    """Remove `flexrun-run-<pid>-*` directories whose run is gone (e.g. SIGKILLed)."""
    removed = []
    for d in root.glob("flexrun-run-*"):
        m = _RUN_DIR.fullmatch(d.name)
        if m and d.is_dir() and not _run_alive(d, int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _run_alive(d: Path, pid: int) -> bool:
    """Alive while its pid is; a dead-looking pid still counts while the run holds d/.lock
    (a run in another PID namespace or on another host sharing the directory)."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        pass
    except (OSError, OverflowError):        # EPERM: alive, another user's
        return True
    try:
        fd = os.open(d / ".lock", os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def map_pages(f) -> tuple[mmap.mmap, bool]:
    """A private mapping of the open file f, its pages mapped now (MADV_POPULATE_READ); False
    where the kernel lacks that (their reads start now, and they fault in on first use)."""
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        mm.madvise(MADV_POPULATE_READ)
        return mm, True
    except OSError:
        try:
            mm.madvise(mmap.MADV_WILLNEED)
        except OSError:
            pass
        return mm, False


DIR_MODE, FILE_MODE = 0o700, 0o600     # offload data is private to its owner


def private_dir(path: Path) -> None:
    """Create directory `path` (it must not exist) with mode 0700 whatever the umask."""
    os.mkdir(path, DIR_MODE)
    os.chmod(path, DIR_MODE)        # a umask such as 0777 may have cleared the owner's bits


def private_open(path: Path, flags: int) -> int:
    """os.open(path, flags | O_CREAT) of a file with mode 0600 whatever the umask (also when
    it exists)."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def offload_error(e: OSError, path: Path, action: str = "write") -> FlexrunError:
    """The one-line error for a failed offload-file write or read (disk full or other I/O
    error)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return FlexrunError(f"disk full while writing offload files to {path.parent}: free "
                            "space or pass an --offload-dir on a larger disk")
    return FlexrunError(f"cannot {action} offload file {path}: {e.strerror}")


class DiskTier:
    """One directory of per-tensor files, owned by one run; removed on close(). The directory
    is 0700 and every file in it 0600, whatever the umask (private_dir, private_open)."""

    CHUNK = 64 << 20

    def __init__(self, root: str | Path, workers: int = 4):
        root = Path(root)
        if not root.exists():
            raise FlexrunError(f"offload directory {root} does not exist: create it or pass "
                               "another --offload-dir")
        if not root.is_dir():
            raise FlexrunError(f"offload directory {root} is not a directory: pass a directory "
                               "as --offload-dir")
        if not os.access(root, os.W_OK):
            raise FlexrunError(f"offload directory {root} is not writable: pass a writable "
                               "--offload-dir")
        remove_stale_runs(root)
        self.dir = root / f"flexrun-run-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock: int | None = None
        try:                                # nothing may leak, even on KeyboardInterrupt
            private_dir(self.dir)
            self._lock = private_open(self.dir / ".lock", os.O_RDWR)
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX)  # held until close() or process death
            except OSError:
                pass                        # no locks here (some NFS): the pid check only
            self.pool = ThreadPoolExecutor(workers, thread_name_prefix="flexrun-disk")
        except BaseException as e:
            shutil.rmtree(self.dir, ignore_errors=True)
            if self._lock is not None:
                os.close(self._lock)
            if isinstance(e, OSError):
                raise FlexrunError(f"cannot create files in offload directory {root} "
                                   f"({e.strerror}): pass a writable --offload-dir") from None
            raise
        self._n = 0

    def new_path(self, name: str) -> Path:
        self._n += 1
        return self.dir / f"{self._n:06d}-{name.replace('/', '_')}.bin"

    def write(self, path: Path, t: torch.Tensor) -> None:
        data = t.detach().contiguous().cpu().view(torch.uint8).numpy()
        try:
            with os.fdopen(private_open(path, os.O_WRONLY | os.O_TRUNC), "wb") as f:
                mv = memoryview(data.reshape(-1))
                for i in range(0, len(mv), self.CHUNK):
                    f.write(mv[i:i + self.CHUNK])
        except OSError as e:
            raise offload_error(e, path) from None

    def read_into(self, path: Path, out: torch.Tensor) -> torch.Tensor:
        mv = memoryview(out.view(torch.uint8).numpy().reshape(-1))
        with open(path, "rb", buffering=0) as f:
            pos = 0
            while pos < len(mv):
                n = f.readinto(mv[pos:pos + self.CHUNK])
                if not n:
                    raise FlexrunError(f"offload file {path} is truncated")
                pos += n
        return out

    def map_read(self, ref: DiskRef) -> torch.Tensor:
        """The file as a tensor over a private mapping of its page-cache pages: no copy and
        no buffer of its own. Its pages are mapped now (read from the device first when not
        cached) and unmapped when the tensor is freed. Nothing writes through it; a write
        would stay private to the process. Parts under MAP_MIN, and files that cannot be
        mapped, are read into a fresh tensor instead."""
        mm = None
        if ref.nbytes >= MAP_MIN:           # below, a copy costs less than a mapping's calls
            try:
                with open(ref.path, "rb") as f:
                    try:
                        mm, _ = map_pages(f)
                    except (OSError, ValueError):   # no mmap here, or an empty file
                        pass
            except OSError as e:
                raise offload_error(e, ref.path, "read") from None
        if mm is None:
            return self.read_into(ref.path, torch.empty(ref.shape, dtype=ref.dtype))
        if len(mm) < ref.nbytes:
            raise FlexrunError(f"offload file {ref.path} is truncated")
        return torch.frombuffer(mm, dtype=ref.dtype,
                                count=torch.Size(ref.shape).numel()).view(ref.shape)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


class TieredStore:
    """Values (tensors or Compressed) kept on the tier chosen for each, fetched to compute."""

    def __init__(self, device: torch.device, disk: DiskTier | None, pin: bool):
        self.device = device
        self.disk = disk
        self.pin = pin and device.type == "cuda"
        self.homes: dict[str, tuple[str, object]] = {}

    def put(self, name: str, value, tier: str) -> None:
        if tier == "gpu":
            stored = map_parts(value, lambda t: t.to(self.device))
        elif tier == "cpu":
            def to_host(t):
                t = t.to("cpu")
                return pinned_copy(t) if self.pin else t
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
