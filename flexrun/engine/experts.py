"""Routed experts whose weights live off the compute device: fetched or computed on demand.

A MoE layer's dense part (attention, norms, router, shared expert) and its experts on the
compute device load with the unit (Pipeline). Experts homed in host memory or on disk are
left out of that load: once a batch is routed, only the experts that received tokens are
brought in, and each of them once per block: a copy made for one GPU batch of the block
serves the block's later batches too (the zig-zag order runs them back to back on the unit).

Two lanes run such an expert: the copy lane copies it to the compute device (its copies are
issued at once on the weight stream, computed as each arrives, after the resident experts),
the CPU lane computes it on the host where it lives (its tokens go down, the output comes
back); "auto" sends the experts with the fewest tokens to the CPU lane while that lane's
predicted time stays below the copy lane's (LaneRates), so that both finish together.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from flexrun.engine import expert_copies
from flexrun.engine.expert_copies import ExpertCopies
from flexrun.engine.expert_lanes import (LaneRates, LaneStats, measure_rates, split_lanes,
                                         uses_left)
from flexrun.engine.expert_staging import ExpertStaging
from flexrun.engine.trace import Tracer
from flexrun.memory.storage import TieredStore
from flexrun.models.moe import (ExpertGroup, add_expert_outputs, expert, expert_activation,
                                plain_experts, scaled_expert, touches_nearly_all,
                                weighted_expert)
from flexrun.models.moe_grouped import grouped_mm_works
from flexrun.models.spec import ModelSpec

PARTS = ("gate", "up", "down")      # the weights the staging slots hold
GROUPED_ON_CPU = False      # tests: stage and group the device experts on a CPU run too
READERS = 2                 # threads reading a call's disk experts from the offload files


@dataclass
class TieredExperts(ExpertCopies):
    """The off-device experts of a pipeline's MoE layers and the runner of their tokens."""
    spec: ModelSpec
    weights: TieredStore
    device: torch.device
    dtype: torch.dtype = torch.float16
    lanes: str = "auto"                     # Policy.expert_lanes
    rates: LaneRates = field(default_factory=LaneRates)
    tracer: Tracer | None = None
    weight_stream: object = None            # CUDA: the copies' stream
    compute_stream: object = None
    mapped: bool = False                    # CPU run: disk experts mapped from the page cache
    stats: LaneStats = field(default_factory=LaneStats)
    # stage every expert of a call expected to touch nearly all (stack); off when the
    # placement followed routing counts (the off-device experts are the cold ones)
    stage_all: bool = True
    block_batches: int = 1                  # GPU batches of the block being run
    steps_follow: bool = False              # a decode step of the block comes after this one

    def __post_init__(self) -> None:
        self.cuda = self.device.type == "cuda"
        # an expert's tensors (its weights, and biases where the model has them) and its
        # gated activation
        self.parts = tuple(f"{p}.weight" for p in PARTS) + (
            tuple(f"{p}.bias" for p in PARTS) if self.spec.expert_bias else ())
        self.act = expert_activation(self.spec)
        self.remote: dict[int, dict[int, str]] = {}     # layer -> expert -> tier
        for j in range(self.spec.num_layers):
            if not self.spec.is_moe(j):
                continue
            for e in range(self.spec.num_experts):
                if self.name(j, e, "gate.weight") not in self.weights.homes:
                    break                                   # another pipeline stage's layer
                tiers = {self.weights.tier_of(self.name(j, e, p)) for p in self.parts}
                if tiers != {"gpu"}:
                    self.remote.setdefault(j, {})[e] = max(tiers, key=("gpu", "cpu",
                                                                       "disk").index)
        self._cpu = ThreadPoolExecutor(1, thread_name_prefix="flexrun-cpu-experts")
        # disk experts read into host buffers (not mapped): by reader threads, so the reads
        # of a call overlap each other and the device experts' GEMMs
        reads = not self.mapped and any(t == "disk" for es in self.remote.values()
                                        for t in es.values())
        self._reader = ThreadPoolExecutor(READERS, thread_name_prefix="flexrun-expert-reads") \
            if reads else None
        self._layer, self._held, self._batch = None, {}, 0
        self._stages_all = False        # the last call staged every expert (or would have)
        self._ahead: dict[int, set[int]] = {}           # layer -> experts copied ahead
        # unstaged experts (4-bit ones...) copied ahead: layer -> expert -> (weights, event)
        self._held_ahead: dict[int, dict[int, tuple]] = {}
        self._copies_all = False        # the last unstaged MoE unit copied all its experts
        # this unit's grouped 4-bit address tables (False: its calls go expert by expert)
        self._tables: tuple | bool | None = None
        self._unused_ahead: set[int] = set()
        self._sizes: dict[tuple[int, int], int] = {}     # (layer, expert) -> bytes
        self.staging = self._staging() if self.remote else None
        if self.cuda and self.lanes == "auto":
            self.calibrate()

    def _staging(self) -> ExpertStaging | None:
        """Grouped GEMMs for layers split over tiers, on a GPU (where launches per expert
        cost most; GROUPED_ON_CPU for tests) with plain (not 4-bit) silu-gated experts
        without biases."""
        if not (self.cuda or GROUPED_ON_CPU) or not plain_experts(self.spec):
            return None
        j, es = next(iter(self.remote.items()))
        sample = self.weights.homes[self.name(j, next(iter(es)), "gate.weight")][1]
        h, f = self.spec.hidden_size, self.spec.expert_ffn_dim
        if not ExpertStaging.applies(self.device, self.dtype, h, f, sample):
            return None
        return ExpertStaging(self.spec.num_experts, h, f, self.device, self.dtype,
                             self.weight_stream, self.compute_stream)

    def calibrate(self) -> None:
        """Measure the lane rates on one host-memory expert: a pinned copy to the device, and
        a CPU GEMM over 8 token rows (the CPU lane's small-batch case)."""
        at = next(((j, e) for j, es in self.remote.items() for e, t in es.items()
                   if t == "cpu"), None)
        if at is None:
            return
        w = {f"experts.{at[1]}.{p}": self.weights.read_host(self.name(*at, p))
             for p in self.parts}

        def copy() -> None:
            for p in self.parts:
                self.weights.fetch(self.name(*at, p), host_value=w[f"experts.{at[1]}.{p}"])
            torch.cuda.synchronize(self.device)
        x = torch.randn(8, self.spec.hidden_size, dtype=self.dtype)
        self.rates = measure_rates(copy, lambda: expert(x, w, f"experts.{at[1]}.", self.act),
                                   self._nbytes(*reversed(at)), self.rates.cpu_flops)

    @staticmethod
    def name(layer: int, e: int, part: str) -> str:
        """The tensor name of `part` ("gate.weight", "down.bias", ...) of an expert."""
        return f"layers.{layer}.experts.{e}.{part}"

    def remote_names(self, layer: int) -> set[str]:
        """The tensor names of `layer`'s experts that the unit load leaves out."""
        return {self.name(layer, e, p) for e in self.remote.get(layer, ()) for p in self.parts}

    def begin_unit(self, layer: int | None) -> None:
        """A unit starts on the block's first batch: the previous unit's copies go (those
        copied ahead for this one stay)."""
        if self._layer in self.remote and self.staging is None:
            self._copies_all = len(self._held) >= len(self.remote[self._layer])
        self._layer, self._batch, self._tables = layer, 0, None
        self._held = self._held_ahead.pop(layer, {})
        # experts copied ahead for this unit: their first use in the block is no reuse
        self._unused_ahead = self._ahead.pop(layer, set()) if layer in self.remote else set()
        if self.staging is not None and layer in self.remote:
            self.staging.begin_unit(layer)

    def copy_ahead(self) -> None:
        """Once the current unit's host experts came ahead: queue the next unit's copies now
        (called as the unit starts, after its own activation and weight loads and, when its
        batches attend first, their attention outputs' copies are queued: an H2D copy queued
        behind ~1 GB of experts waits for them), not at its first MoE call."""
        layer = self._layer
        if self.staging is not None and layer in self.remote and self._stages_all and \
                self.staging.staged >= self.remote[layer].keys():
            self._prefetch_next()
        elif self.staging is None and layer in self.remote and self._copies_all and \
                self.lanes != "cpu" and (self.cuda or expert_copies.HELD_AHEAD_ON_CPU):
            self._hold_next()

    def runner(self, layer: int):
        """moe_mlp's runner for `layer` (this object: called with a batch's routed groups,
        or asked for a stack of all experts first): None when every expert is on the
        device."""
        if layer not in self.remote:
            return None
        if self._layer != layer:
            self.begin_unit(layer)
        return self

    def __call__(self, x2: torch.Tensor, w: dict, groups: list[ExpertGroup],
                 out: torch.Tensor) -> None:
        self._run(x2, w, groups, out)
        self._batch += 1

    def stack(self, w: dict, tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every expert of the current unit in the staging slots, for one grouped GEMM over
        all routed pairs with no host sync and no per-expert work, when the block's calls
        (`tokens` rows in each of its GPU batches) are expected to touch nearly all experts
        (E * (1 - (1 - k/E)^rows) >= STAGE_ALL * E: 16 batches of 16 rows touch all of
        Qwen3-MoE's 128): a staged expert serves every later batch of the block, so the
        unit's first call stages them all, copying every off-device one (the CPU lane sits
        out), and the later calls copy nothing. None otherwise: on the CPU lane alone, with
        experts on disk (their reads overlap the GEMMs in the per-expert path) or placed by
        routing counts."""
        if self.staging is None:        # 4-bit experts: held copies, grouped 4-bit GEMMs
            return self._held_stack(w, tokens)
        if not self._can_stage_all or not grouped_mm_works(self.device, self.dtype):
            return None
        self._stages_all = touches_nearly_all(self.spec, tokens * self.block_batches)
        if not self._stages_all:
            return None
        remote = self.remote[self._layer]
        if "disk" in remote.values():
            return None
        fresh = [e for e in range(self.spec.num_experts) if e not in self.staging.staged]
        host = [e for e in fresh if e in remote]
        with self._copy_span(len(host)):
            if host:        # one call: runs of experts back to back in host memory coalesce
                self.staging.put_host_many([(e, *self._read(e)) for e in host])
                self.stats.copied += len(host)
                self.stats.copy_bytes += sum(self._nbytes(e) for e in host)
            for e in fresh:
                if e not in remote:
                    self.staging.put_resident(e, *(w[f"experts.{e}.{p}.weight"]
                                                   for p in PARTS))
        self.stats.reused += len(remote) - len(host) - \
            len(self._unused_ahead & remote.keys())
        self._unused_ahead = set()
        self._prefetch_next()
        self._batch += 1
        return self.staging.ready()

    @property
    def _can_stage_all(self) -> bool:
        """Staging slots, on the copy lane, not placed by routing counts."""
        return self.staging is not None and self.lanes != "cpu" and self.stage_all

    # ---- one MoE call ---------------------------------------------------------------------
    def _run(self, x2: torch.Tensor, w: dict, groups: list[ExpertGroup],
             out: torch.Tensor) -> None:
        """The routed experts of one batch; outputs are added in expert order whatever lane
        computed them, so every placement and lane split sums in the same order."""
        remote = self.remote[self._layer]
        held = self._held if self.staging is None else self.staging.staged
        here = [g for g in groups if g.expert not in remote or g.expert in held]
        away = [g for g in groups if g.expert in remote and g.expert not in held]
        self.stats.reused += sum(g.expert in remote and g.expert not in self._unused_ahead
                                 for g in here)
        self._unused_ahead -= {g.expert for g in here}
        on_cpu, to_copy = self.split(away, x2.shape[0])
        to_copy.sort(key=lambda g: -g.n)    # issued, then computed, busiest first
        # disk experts start reading now; host ones are copied at once, the disk ones once
        # read, after the device experts' GEMMs are queued
        reading = {g.expert: self._reader.submit(self._read, g.expert) for g in to_copy
                   if self._reader is not None and remote[g.expert] == "disk"}
        copy = self._stage_copy if self.staging is not None else self._copy
        with self._copy_span(len(to_copy) - len(reading)):
            for g in to_copy:
                if g.expert not in reading:
                    copy(g.expert)
        cpu_job = self._start_cpu(x2, on_cpu) if on_cpu else None
        if self.staging is not None:    # every device expert in two grouped GEMMs
            for g in here:
                if g.expert not in self.staging.staged:
                    self.staging.put_resident(g.expert, *(w[f"experts.{g.expert}.{p}.weight"]
                                                          for p in PARTS))
            # the experts already on the device first, while this batch's copies land
            ys = self.staging.run(x2, here, copied=False)
        else:
            ys = {g.expert: self._weighted(x2, w, g) for g in here}
        for e, job in reading.items():
            copy(e, job.result())
            self.stats.disk_reads += 1
        if self._can_stage_all and touches_nearly_all(self.spec, x2.shape[0]):
            self._stages_all = True
            self._prefetch_next()       # (a prefill call: the next unit's calls touch all;
            #                             queued after this batch's own copies)
        if self.staging is not None:
            ys.update(self.staging.run(x2, to_copy))
        else:
            ys.update({g.expert: self._weighted(x2, w, g) for g in to_copy})
        if cpu_job is not None:
            for g, y in zip(on_cpu, cpu_job.result()):
                ys[g.expert] = y.pin_memory().to(self.device, non_blocking=True) \
                    if self.cuda else y
        add_expert_outputs(out, groups, [ys.pop(g.expert) for g in groups])

    def split(self, away: list[ExpertGroup], rows: int = 1
              ) -> tuple[list[ExpertGroup], list[ExpertGroup]]:
        """(CPU lane, copy lane) of the routed off-device experts. auto: the experts with
        the fewest tokens go to the CPU lane while that shortens the block's longer lane: a
        copied expert stays on the device for the block's later batches, a CPU-lane one is
        computed again in each batch that routes to it (uses_left: the batches expected to,
        this one included). On a CPU run both lanes compute on the host: auto copies."""
        if self.lanes == "cpu":
            return away, []
        if self.lanes == "copy" or not self.cuda or not away:
            return [], away
        size = {g.expert: self._nbytes(g.expert) for g in away}
        return split_lanes(away, size, self.rates, self.uses_left(rows), self.elem)

    def uses_left(self, rows: int) -> float:
        """The batches of this block, from the current one on, expected to route to a given
        expert routed in this one (expert_lanes.uses_left)."""
        return uses_left(self.spec, self.block_batches - self._batch, rows)

    @property
    def elem(self) -> int:
        return self.dtype.itemsize

    def _weighted(self, x2: torch.Tensor, w: dict, g: ExpertGroup) -> torch.Tensor:
        """Expert g's weighted output from its weights on the device."""
        return weighted_expert(x2, self._device_w(w, g.expert), g, self.act,
                               self.spec.expert_input_scaled)

    def _device_w(self, w: dict, e: int) -> dict:
        held = self._held.get(e)
        if held is None:
            return w
        dev, ev = held
        if ev is not None:
            self.compute_stream.wait_event(ev)
            self._held[e] = (dev, None)
        return dev

    def _start_cpu(self, x2: torch.Tensor, groups: list[ExpertGroup]) -> Future:
        """Compute `groups` on the host in the CPU lane's thread: their tokens go to host
        memory in one copy; the result is each group's weighted output, on the host."""
        xh = x2[torch.cat([g.rows for g in groups])].to("cpu")
        wts = [g.weights.to("cpu") for g in groups]
        sizes = [g.n for g in groups]
        experts, layer = [g.expert for g in groups], self._layer
        self.stats.cpu_runs += len(groups)
        self.stats.cpu_bytes += sum(self._nbytes(e) for e in experts)

        def work() -> list[torch.Tensor]:
            t0 = time.perf_counter()
            with self.tracer.span(f"cpu experts l{layer}", "cpu-experts") if self.tracer \
                    else nullcontext():
                ys, start = [], 0
                for e, n, wt in zip(experts, sizes, wts):
                    w = {f"experts.{e}.{p}": self.weights.read_host(
                        self.name(layer, e, p), mapped=self.mapped) for p in self.parts}
                    ys.append(scaled_expert(xh[start:start + n], w, f"experts.{e}.", wt,
                                            self.act, self.spec.expert_input_scaled))
                    start += n
            self.stats.cpu_s += time.perf_counter() - t0
            return ys
        return self._cpu.submit(work)

    def close(self) -> None:
        self._cpu.shutdown(wait=True)
        if self._reader is not None:
            self._reader.shutdown(wait=True)
        self._held, self._held_ahead, self._tables = {}, {}, None
