"""policy="auto" (the default) for an LLM being built: the workload and the budgets it plans
for, the search, and the one line that says what it chose.

Budgets not given are taken from this machine at start: 90% of the GPU's free memory
(torch.cuda.mem_get_info), 80% of the host's available RAM (MemAvailable of /proc/meminfo, or
the cgroup's limit less its usage when that is lower) and the free space of the offload
directory (nothing goes to disk without one)."""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flexrun.config import FlexrunError, format_size, parse_size
from flexrun.plan.cost_types import SearchResult
from flexrun.plan.hardware import default_profile, read_int
from flexrun.plan.search import search

PROMPT_LEN, GEN_LEN = 512, 32      # what the API plans for when it is not told (workload=)
GPU_SHARE, CPU_SHARE = 0.9, 0.8


def default_workload(max_positions: int) -> tuple[int, int, None]:
    """(prompt, new tokens, prompts) to plan for without a workload: 512 + 32 tokens, cut to
    the model's positions; any number of prompts."""
    gen = max(1, min(GEN_LEN, max_positions // 2))
    return max(1, min(PROMPT_LEN, max_positions - gen)), gen, None


def available_ram() -> int:
    """Bytes this process can still take: MemAvailable, or less under a cgroup limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:       # no /proc/meminfo: physical memory
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        lim, use = read_int(limit), read_int(usage)
        if lim is not None and use is not None and lim < 1 << 60:
            avail = min(avail, max(0, lim - use))
    return avail


def free_disk(path: str) -> int:
    """Free bytes of the file system that holds path (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


@dataclass
class Budgets:
    """Bytes per budget ("gpu" / "cpu" / "disk"; inf: unbounded) and, for each one taken
    from the machine, where it came from."""
    caps: dict
    notes: dict = field(default_factory=dict)

    def describe(self, cuda: bool) -> str:
        parts = []
        for tier in ("gpu", "cpu", "disk") if cuda else ("cpu", "disk"):
            v = self.caps[tier]
            if math.isinf(v):
                continue
            note = self.notes.get(tier)
            if tier == "disk" and v == 0:
                parts.append(f"no disk ({note})" if note else "no disk")
                continue
            parts.append(f"{tier} {format_size(v)}" + (f" ({note})" if note else ""))
        return ", ".join(parts) or "none"


def budgets(device: torch.device, gpu_mem, cpu_mem, disk_mem,
            offload_dir: str | None) -> Budgets:
    """The given budgets; the missing ones from this machine (module docstring)."""
    b = Budgets({"gpu": parse_size(gpu_mem), "cpu": parse_size(cpu_mem),
                 "disk": parse_size(disk_mem)})
    c, notes = b.caps, b.notes
    if device.type != "cuda":
        c["gpu"] = math.inf
    elif c["gpu"] is None:
        c["gpu"] = int(GPU_SHARE * torch.cuda.mem_get_info(device)[0])
        notes["gpu"] = f"{GPU_SHARE:.0%} of free"
    if c["cpu"] is None:
        c["cpu"], notes["cpu"] = int(CPU_SHARE * available_ram()), f"{CPU_SHARE:.0%} of available"
    if offload_dir is None:
        c["disk"], notes["disk"] = 0, "no --offload-dir"
    elif c["disk"] is None:
        c["disk"], notes["disk"] = free_disk(offload_dir), "free"
    return b


@dataclass
class AutoPlan:
    result: SearchResult
    budgets: Budgets
    workload: tuple         # (longest prompt, new tokens, prompts or None)
    cuda: bool = False

    def line(self) -> str:
        """The chosen plan in one line."""
        p, pred = self.result.policy, self.result.prediction
        fmt = lambda t: "/".join(f"{x:g}" for x in t)  # noqa: E731
        P, G, N = self.workload
        prompts = f"{N} prompts" if N else "prompts"
        return (f"policy auto: batch {p.gpu_batch_size} x {p.num_gpu_batches}, weights "
                f"{fmt(p.weights_split())}, cache {fmt(p.cache_split())}, act "
                f"{fmt(p.act_split())} (% gpu/cpu/disk)"
                + (", cpu attention" if p.cpu_attention else "")
                + (f" ({p.compression()})" if p.compression() else "")
                + f"; planned for {prompts} of <= {P} + {G} tokens within "
                f"{self.budgets.describe(self.cuda)}; predicted {pred.throughput:.1f} tok/s "
                f"({self.result.search_s:.2f}s search)")


def plan_for_llm(llm) -> AutoPlan:
    """The searched plan of an LLM being built: its workload (llm.auto_*), its budgets
    (given, else this machine's), its device's profile, its dtype and compression flags."""
    b = budgets(llm.device, llm.gpu_mem, llm.cpu_mem, llm.disk_mem, llm.offload_dir)
    cap = lambda t: None if math.isinf(b.caps[t]) else b.caps[t]   # noqa: E731
    wl = (llm.auto_prompt_len, llm.auto_gen_len, llm.auto_num_prompts)
    try:
        res = search(llm.spec, default_profile(llm.device), wl[0], wl[1], cap("gpu"),
                     cap("cpu"), cap("disk"), llm.device.type,
                     llm.dtype.itemsize, num_prompts=wl[2],
                     compress_weight=llm.compress_weight, compress_cache=llm.compress_cache,
                     cpu_held=getattr(llm, "ckpt_held", 0))
    except FlexrunError as e:
        if llm.offload_dir is None:
            raise FlexrunError(f"{e}; without --offload-dir nothing may go to disk: pass "
                               "--offload-dir DIR to let the plan use it") from None
        raise
    return AutoPlan(res, b, wl, llm.device.type == "cuda")

