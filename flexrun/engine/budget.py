"""The run's measured memory peaks against its budgets (--gpu-mem, --cpu-mem), checked after
every block: one warning line with the figures when a budget was exceeded; the run goes on.

What is measured:
- GPU: torch.cuda.max_memory_reserved (the caching allocator's peak, rounding included) plus
  the CUDA context, estimated once at start as the device's used memory (mem_get_info) minus
  what the allocator had reserved then.
- CPU: the peak of the process's anonymous RSS (RssAnon of /proc/self/status: heap, torch's
  host tensors, cudaHostRegister'd buffers; not the page cache of mapped disk files) plus the
  pinned host allocator's peak (pin_memory blocks come from cudaHostAlloc, outside RssAnon).
  The kernel keeps no peak of RssAnon (VmHWM counts file pages too), so a daemon thread
  samples it every `interval` seconds from the start of the run and at each block's end: a
  spike shorter than the interval can be missed.
"""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from flexrun.config import format_size


def rss_anon() -> int:
    """Anonymous resident bytes of this process (0 where /proc/self/status has no RssAnon)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def settled_rss() -> int:
    """rss_anon once freed memory has gone back: glibc's heap trimmed (where there is
    glibc). No garbage collection: in a process of millions of objects it takes 0.4 s."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss_anon()


def pinned_peak() -> int:
    """Peak bytes of torch's pinned host allocator (0 without CUDA)."""
    if not torch.cuda.is_available():
        return 0
    return int(torch.cuda.host_memory_stats().get("allocated_bytes.peak", 0))


SHARED_GPU = 2 << 30    # more held outside the allocator at start than a CUDA context takes


def cuda_context_bytes(device: torch.device) -> int:
    """The device's used memory not held by this process's allocator: the CUDA context (and
    whatever other processes hold on the same GPU)."""
    free, total = torch.cuda.mem_get_info(device)
    return max(0, total - free - torch.cuda.memory_reserved(device))


class RssSampler:
    """The highest RssAnon seen by a daemon thread reading it every `interval` seconds."""

    def __init__(self, interval: float = 0.05):
        self.peak = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True,
                                         name="flexrun-rss")
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sample()

    def sample(self) -> int:
        self.peak = max(self.peak, rss_anon())
        return self.peak

    def close(self) -> None:
        self._stop.set()


@dataclass
class Peaks:
    gpu: int = 0            # max_memory_reserved + CUDA context
    gpu_reserved: int = 0
    cpu: int = 0            # anonymous RSS peak + pinned peak
    cpu_anon: int = 0
    cpu_pinned: int = 0


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class BudgetCheck:
    """Measures this process's peaks and warns, once per budget, when one is over it.
    gpu_mem / cpu_mem: the budgets in bytes (None: not checked)."""

    def __init__(self, device: torch.device, gpu_mem: int | None, cpu_mem: int | None,
                 say: Callable[[str], None] = _stderr, interval: float = 0.05):
        self.device, self.say = device, say
        self.gpu_mem = gpu_mem if device.type == "cuda" else None
        self.cpu_mem = cpu_mem
        self.context = cuda_context_bytes(device) if self.gpu_mem is not None else 0
        self.sampler = RssSampler(interval) if cpu_mem is not None else None
        self.warned: set[str] = set()
        self.blocks = 0
        if self.context > SHARED_GPU:
            self.say(f"flexrun: warning: {format_size(self.context)} of the GPU is held outside "
                     "this process's allocator at start (a CUDA context takes about 0.5GiB): "
                     "another process is using this GPU; its memory counts against --gpu-mem "
                     "here, and it shares the GPU's time and links")

    @property
    def active(self) -> bool:
        return self.gpu_mem is not None or self.cpu_mem is not None

    def peaks(self) -> Peaks:
        p = Peaks()
        if self.gpu_mem is not None:
            p.gpu_reserved = torch.cuda.max_memory_reserved(self.device)
            p.gpu = p.gpu_reserved + self.context
        if self.sampler is not None:
            p.cpu_anon, p.cpu_pinned = self.sampler.sample(), pinned_peak()
            p.cpu = p.cpu_anon + p.cpu_pinned
        return p

    def after_block(self) -> list[str]:
        """Compare the peaks so far with the budgets; the warning lines said (new ones only)."""
        self.blocks += 1
        if not self.active:
            return []
        p, f = self.peaks(), format_size
        lines = []
        if self.gpu_mem is not None and p.gpu > self.gpu_mem and "gpu" not in self.warned:
            lines.append(f"GPU memory peak {f(p.gpu)} (reserved {f(p.gpu_reserved)} + CUDA "
                         f"context {f(self.context)}) is over --gpu-mem {f(self.gpu_mem)}")
            self.warned.add("gpu")
        if self.cpu_mem is not None and p.cpu > self.cpu_mem and "cpu" not in self.warned:
            lines.append(f"CPU memory peak {f(p.cpu)} (anonymous RSS {f(p.cpu_anon)} + pinned "
                         f"{f(p.cpu_pinned)}) is over --cpu-mem {f(self.cpu_mem)}")
            self.warned.add("cpu")
        for line in lines:
            self.say(f"flexrun: warning: {line} after block {self.blocks}; the run goes on")
        return lines

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
