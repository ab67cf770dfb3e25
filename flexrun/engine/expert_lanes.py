"""Which lane runs each routed off-device expert, and what the lanes did.

A copied expert stays on the compute device for the block's later GPU batches; one on the
CPU lane is computed again in each batch that routes to it. "auto" sends the experts with
the fewest tokens to the CPU lane while that shortens the longer lane, the CPU time of each
counted once per batch expected to route to it (uses_left).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from flexrun.models.moe import ExpertGroup
from flexrun.models.spec import ModelSpec


@dataclass
class LaneRates:
    """What the auto split predicts lane times with (bytes/s, FLOP/s)."""
    copy_bps: float = 20e9          # host -> device copy of expert weights
    cpu_bps: float = 10e9           # weights read by a CPU expert GEMM (small row counts)
    cpu_flops: float = 200e9        # CPU GEMM rate once rows make it compute bound


@dataclass
class LaneStats:
    """Routed experts run off the compute device, summed over a run."""
    copied: int = 0                 # expert copies made (one per block and layer at most)
    copy_bytes: int = 0
    disk_reads: int = 0             # of those, experts read from the disk tier by the readers
    reused: int = 0                 # expert runs served by a copy made for an earlier batch
    #                                 (a stacked call counts every staged off-device expert)
    cpu_runs: int = 0               # expert runs on the CPU lane
    cpu_bytes: int = 0
    cpu_s: float = 0.0              # time the CPU lane computed

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def uses_left(spec: ModelSpec, batches_left: int, rows: int) -> float:
    """The batches from the current one on (batches_left of the block) expected to route to
    an expert routed in this one: 1 + (the later batches) x P(a batch of `rows` tokens touches
    it)."""
    E, k = spec.num_experts, spec.experts_per_token
    return 1.0 + max(batches_left - 1, 0) * (1.0 - (1.0 - k / E) ** rows)


def split_lanes(away: list[ExpertGroup], size: dict[int, int], r: LaneRates, uses: float,
                elem: int) -> tuple[list[ExpertGroup], list[ExpertGroup]]:
    """(CPU lane, copy lane) of `away` (size: each expert's bytes): the experts with the
    fewest tokens move to the CPU lane while that shortens the longer lane."""
    copy_t = sum(size.values()) / r.copy_bps
    cpu_t, picked = 0.0, set()
    for g in sorted(away, key=lambda g: g.n):
        b = size[g.expert]
        t = uses * max(b / r.cpu_bps, 2 * b / elem * g.n / r.cpu_flops)
        if max(cpu_t + t, copy_t - b / r.copy_bps) >= max(cpu_t, copy_t):
            break
        cpu_t, copy_t = cpu_t + t, copy_t - b / r.copy_bps
        picked.add(g.expert)
    return ([g for g in away if g.expert in picked],
            [g for g in away if g.expert not in picked])


def measure_rates(copy: Callable[[], None], compute: Callable[[], object], nbytes: int,
                  cpu_flops: float) -> LaneRates:
    """LaneRates from one expert of `nbytes`: `copy` brings it to the device (and waits),
    `compute` runs its GEMMs on the host over a few rows; each the best of two after one
    warm-up."""
    def best(fn) -> float:
        fn()
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)
    return LaneRates(copy_bps=nbytes / best(copy), cpu_bps=nbytes / best(compute),
                     cpu_flops=cpu_flops)
