"""Loading the weights of a pipeline's units: streamed units' host->GPU copies on the weight
stream (disk reads on I/O threads), started weights_ahead streamed units ahead of the one
computing, in schedule order (Pipeline.run_block)."""
from __future__ import annotations

from bisect import bisect_right
from concurrent.futures import Future

import torch

from flexrun.engine.schedule import Task, next_unit
from flexrun.memory.storage import Arena, new_future


class UnitLoads:
    """Pipeline's unit weight loads (a mixin: the pipeline holds the weights, streams, tiers,
    I/O pool and tracer these use)."""

    def _arena(self, u: int) -> Arena | None:
        """The host buffer unit u's disk weights are read into on a CPU run: two, used in
        turn, so the next unit loads while this one computes (CPU compute is synchronous, so
        the unit before is done with its buffer). GPU runs read into pinned tensors; CPU runs
        map the page cache (no buffer) unless FLEXRUN_MAP_DISK=0."""
        if self.cuda or self.maps_disk or "disk" not in self.unit_tiers[u]:
            return None
        self._loads += 1
        return self._arenas[self._loads % 2].reset(self.weights.disk_bytes(self.unit_names[u]))

    def _load_unit(self, u: int, arena: Arena | None = None, ordered: bool = False,
                   into: tuple | None = None) -> tuple[dict, object]:
        """Unit u's weights on the compute device, and their ready event. ordered: buffers
        from the compute stream's pool (TieredStore.fetch_ordered; the main thread only).
        into: those buffers and their event, reserved by the main thread when the load
        started (TieredStore.reserve_ordered), for a load on an I/O thread."""
        with self.tracer.span(f"load w{u}", "io-thread"):
            host = {n: self.weights.read_host(n, pinned=self.cuda, arena=arena,
                                              mapped=self.maps_disk)
                    for n in self.unit_names[u]}
        if not self.cuda or not self.policy.overlap:
            return {n: self.weights.fetch(n, host_value=host[n]) for n in host}, None
        with self.tracer.span(f"h2d w{u}", "weight-stream", self.weight_stream):
            if into is not None:
                out = self.weights.copy_ordered(*into, host, self.weight_stream)
            elif ordered:
                out = self.weights.fetch_ordered(host, self.weight_stream, self.compute_stream)
            else:
                out = {n: self.weights.fetch(n, self.weight_stream, self.compute_stream, host[n])
                       for n in host}
        ev = torch.cuda.Event()
        ev.record(self.weight_stream)
        return out, ev

    def _start_load(self, u: int) -> Future:
        """Start fetching unit u: disk reads go to an I/O thread; host->GPU copies are issued
        at once on the weight stream; resident units need nothing (and wait for no copy)."""
        if self.unit_tiers[u] == {"gpu"}:
            return new_future(({n: self.weights.fetch(n) for n in self.unit_names[u]}, None))
        if not self.policy.overlap:
            return new_future(None)
        if "disk" in self.unit_tiers[u] and not self.maps_disk:
            # buffers from the compute stream's pool, in its order as of now (the copies
            # overlap this unit's compute), not the weight stream's own pool, whose blocks
            # record_stream keeps from reuse until that stream passes their free
            into = self.weights.reserve_ordered(self.unit_names[u], self.compute_stream) \
                if self.cuda else None
            return self.io.submit(self._load_unit, u, self._arena(u), into=into)
        return new_future(self._load_unit(u, ordered=self.policy.pin_weights))

    def _wait_load(self, fut: Future, u: int) -> dict:
        res = fut.result()
        if res is None:  # no overlap: load now, synchronously
            res = self._load_unit(u, self._arena(u))
        w, ev = res
        if ev is not None:
            self.compute_stream.wait_event(ev)
        if u == 0 or u == self.spec.num_units - 1:
            return w
        prefix = f"layers.{u - 1}."
        return {n[len(prefix):]: t for n, t in w.items()}

    def _start_next(self, task: Task, loads: dict[int, Future], gen_len: int) -> None:
        """Start loading the next weights_ahead streamed units after task's (in schedule
        order, the next steps' included) that are not on their way: a copy overlaps the
        compute of every resident unit before its own, and at most 1 + weights_ahead
        streamed units are held at a time. With activations offloaded, only the next unit's:
        their copies back (_prefetch_acts) must not queue behind a later unit's weights."""
        if not self.acts_resident:
            nxt = next_unit(task, gen_len, self.spec.num_units)
            if nxt is not None and nxt not in loads and self.unit_tiers[nxt] != {"gpu"}:
                loads[nxt] = self._start_load(nxt)
            return
        unit, step = task.unit, task.step
        for _ in range(self.weights_ahead):
            later = bisect_right(self.streamed, unit)
            if later < len(self.streamed):
                unit = self.streamed[later]
            elif self.streamed and step + 1 < gen_len:
                unit, step = self.streamed[0], step + 1
            else:
                return
            if unit not in loads:
                loads[unit] = self._start_load(unit)
