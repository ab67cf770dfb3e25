"""What one Ray actor may plan with when several actors share a host.

Actors on one host share its PCIe link, its DRAM (bandwidth and capacity), its disk and its
cores. The cost model plans one process with the whole machine, so an actor plans with a
profile and budgets divided among the actors of its host: k actors each get 1/k of every
host-wide rate and capacity; an actor holding a fraction f < 1 of a GPU gets f of the GPU's
rates and memory. N actors on N hosts keep the whole host each (linear scaling); k actors on
one host together never plan more link bandwidth than the host has."""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil

from flexrun.config import FlexrunError, parse_size
from flexrun.plan.hardware import HardwareProfile, default_profile

# rates and capacities of the host, shared by every actor on it
HOST_FIELDS = ("h2d_pinned", "d2h_pinned", "h2d_pageable", "d2h_pageable", "disk_read",
               "disk_write", "disk_read_cached", "disk_read_cached_fresh", "disk_map_cached",
               "cpu_flops_decode", "cpu_flops_prefill", "cpu_flops_decode_bf16",
               "cpu_flops_prefill_bf16", "cpu_flops_decode_small",
               "cpu_flops_decode_small_bf16", "cpu_mem_bw", "cpu_read_bw", "cpu_attn_bw",
               "cpu_attn_bw_with_h2d", "cpu_mem", "disk_mem")
CPU_SHARE = 0.8        # of the host's memory, split among its actors when none is given
# rates and capacity of one GPU, shared by the actors that split it (num_gpus < 1)
GPU_FIELDS = ("gpu_flops_decode", "gpu_flops_prefill", "gpu_mem_bw", "gpu_attn_bw",
              "gpu_w4_bw", "gpu_w4_flops", "gpu_mem")


@dataclass(frozen=True)
class HostShare:
    """One actor's part of its host: `actors` actors share the host, `gpu_fraction` is the
    part of a GPU each holds (1.0: a GPU or more of its own)."""
    actors: int = 1
    gpu_fraction: float = 1.0

    def __post_init__(self):
        if not isinstance(self.actors, int) or self.actors < 1:
            raise FlexrunError(f"actors per host must be an integer >= 1, got {self.actors!r}")
        if not 0 < self.gpu_fraction <= 1:
            raise FlexrunError(f"gpu_fraction must be in (0, 1], got {self.gpu_fraction!r}")


def actors_per_host(node: dict, asked: dict, pool: int | None = None) -> int:
    """Actors of one pool that fit on a node of resources `node` ({"CPU": 16, "GPU": 8}) when
    each asks `asked` ({"CPU": 1, "GPU": 1}): the fewest any asked resource allows (Ray packs a
    node as full as it fits), at most the pool's size, at least 1."""
    fits = [int(node.get(r, 0) // v) for r, v in asked.items() if v and v > 0]
    k = max(1, min(fits)) if fits else 1
    return max(1, min(k, pool)) if pool else k


def shared_profile(prof: HardwareProfile, share: HostShare) -> HardwareProfile:
    """The profile one actor plans with: host-wide rates and capacities divided by the
    actors of the host, a split GPU's by its fraction; cpu_cores divided too."""
    out = dataclasses.replace(prof, notes=dict(prof.notes))
    for name, div in [(f, share.actors) for f in HOST_FIELDS] + \
                     [(f, 1 / share.gpu_fraction) for f in GPU_FIELDS]:
        v = getattr(prof, name)
        if v is not None and div != 1:
            setattr(out, name, type(v)(v / div) if isinstance(v, int) else v / div)
    out.cpu_cores = max(1, prof.cpu_cores // share.actors)
    if share.actors > 1 or share.gpu_fraction < 1:
        out.notes["host_share"] = {"actors": share.actors, "gpu_fraction": share.gpu_fraction}
    return out


def host_ram() -> int:
    """The host's memory in bytes (physical, or the cgroup's limit when lower)."""
    total = psutil.virtual_memory().total
    try:
        v = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        return min(total, int(v)) if v.isdigit() else total
    except OSError:
        return total


def shared_budgets(gpu_mem, cpu_mem, disk_mem, share: HostShare,
                   offload_dir: str | None = None, ram: int | None = None
                   ) -> tuple[int | None, int | None, int | None]:
    """(gpu, cpu, disk) bytes of one actor: gpu_mem is per GPU (times a split GPU's
    fraction); cpu_mem and disk_mem are the host's, divided among its actors. When several
    share the host, a budget not given is set from the whole host (CPU_SHARE of its memory
    `ram`, the offload directory's free space) and divided too, so no actor plans with what
    another one takes; alone, None is left to the LLM's own default."""
    gpu, cpu, disk = parse_size(gpu_mem), parse_size(cpu_mem), parse_size(disk_mem)
    k = share.actors
    if k > 1 and cpu is None:
        cpu = int(CPU_SHARE * (ram if ram is not None else host_ram()))
    if k > 1 and disk is None and offload_dir is not None:
        disk = shutil.disk_usage(offload_dir).free
    div = lambda x, d: None if x is None else int(x // d)  # noqa: E731
    return div(gpu, 1 / share.gpu_fraction), div(cpu, k), div(disk, k)


def host_profile(device: str) -> HardwareProfile:
    """default_profile(device), one actor of a host at a time: where no shipped profile
    matches, the first measures the host alone (the others wait, then read its cached one)
    instead of all measuring it at once, each seeing a fraction of it."""
    try:
        f = open(Path(tempfile.gettempdir()) / "flexrun-profile.lock", "a")
    except OSError:                     # (another user's lock file): no lock
        return default_profile(device)
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        return default_profile(device)  # (closing the file releases the lock)


@contextmanager
def planning_profile(device: str, share: HostShare, profile: str | None = None
                     ) -> Iterator[HardwareProfile]:
    """$FLEXRUN_PROFILE pointed at the shared profile while the block runs (the LLM's own
    policy="auto" search reads it), then restored; yields that profile."""
    base = HardwareProfile.load(profile) if profile else host_profile(device)
    prof = shared_profile(base, share)
    old = os.environ.get("FLEXRUN_PROFILE")
    fd, path = tempfile.mkstemp(prefix="flexrun-share-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(prof.to_dict(), f)
        os.environ["FLEXRUN_PROFILE"] = path
        yield prof
    finally:
        if old is None:
            os.environ.pop("FLEXRUN_PROFILE", None)
        else:
            os.environ["FLEXRUN_PROFILE"] = old
        os.unlink(path)


def gpu_fraction(num_gpus: float | None) -> float:
    """The part of a GPU an actor asking num_gpus holds: 1.0 for a whole GPU or more."""
    return 1.0 if not num_gpus or num_gpus >= 1 else float(num_gpus)
