"""Disk-tier files: one private directory of per-tensor files per run (DiskTier), written
and read in large sequential chunks or mapped from the page cache, plus the helpers around
them (private modes, one-line I/O errors, removal of directories left by dead runs).
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import mmap
import os
import re
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from flexrun.config import FlexrunError

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
