"""How a MoE pipeline's off-device experts reach the compute device: host reads (disk
experts into fresh buffers), copies held for the block (the per-expert route), copies into the
staging slots, and the next MoE unit's copies started ahead while this one computes
(TieredExperts, engine/experts.py, holds the state these use)."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from flexrun.kernels import grouped4
from flexrun.memory.quant import Compressed
from flexrun.memory.storage import nbytes
from flexrun.models.common import joined
from flexrun.models.moe import touches_nearly_all


# tests: unstaged experts' copies as on a GPU run (joined gate and up, copied ahead, grouped
# 4-bit GEMMs) on a CPU run too
HELD_AHEAD_ON_CPU = False


class ExpertCopies:
    """TieredExperts' expert copies (a mixin: the runner holds the weights, streams, staging
    slots, tiers and stats these use)."""

    def _prefetch_next(self) -> None:
        """Start copying the host experts of the next MoE unit with off-device experts into
        the other staging slots, so that they cross the link while this unit computes (its
        calls stage every expert as this one's do). From the last one in decode, the first
        one's of the next step when one follows in the block (steps_follow), so that the
        step's first MoE unit does not wait for its own copies after its attention."""
        j = self._next_remote()
        away = self.remote.get(j, {})
        if j is None or "disk" in away.values() or self.staging.holds(j, away):
            return
        host = {e: self._read(e, j) for e in away}
        with self._copy_span(len(host), j, " ahead"):
            if self.staging.prefetch(j, host):
                self._ahead = {j: set(host)}
                self.stats.copied += len(host)
                self.stats.copy_bytes += sum(self._nbytes(e, j) for e in host)

    def _next_remote(self) -> int | None:
        """The next MoE unit with off-device experts: a later one, else (steps_follow) the
        first one of the next decode step."""
        later = [j for j in self.remote if j > self._layer] or \
            [j for j in self.remote if j < self._layer and self.steps_follow]
        return min(later) if later else None

    def _hold_next(self) -> None:
        """Unstaged experts (4-bit, or with biases): once a unit's calls copied every one of
        its host experts (they touch them all), copy the next MoE unit's host experts to the
        device now, to be held for its block, so that they cross the link while this unit
        computes instead of after the next one's routing (S6q's H100 trace: 11 ms of copies
        then the GEMMs, per layer)."""
        j = self._next_remote()
        away = self.remote.get(j, {})
        if j is None or j == self._layer or j in self._held_ahead or "disk" in away.values():
            return
        with self._copy_span(len(away), j, " ahead"):
            self._held_ahead[j] = {e: self._device_copy(j, e) for e in away}
        self._ahead[j] = set(away)

    def _held_stack(self, w: dict, tokens: int) -> tuple | None:
        """4-bit experts (no staging slots) on the copy lane, when the block's calls are
        expected to touch nearly all of the unit's experts: the unit's first call copies every
        host one not yet held (most came ahead: _hold_next), held for the block, and the
        address tables of all of them, resident or held, serve its calls' two grouped 4-bit
        GEMMs (kernels/grouped4.py) with no host sync and no per-expert work. None where those
        do not apply (experts on disk or plain, resident ones not joined): the per-expert
        route."""
        remote = self.remote[self._layer]
        copied = 0
        if self._tables is None:        # the unit's first call: its tables, for the block
            before = self.stats.copied
            self._tables = self._held_tables(w, remote, tokens) or False
            copied = self.stats.copied - before
        if not self._tables:
            return None
        self.stats.reused += len(remote) - copied - len(self._unused_ahead & remote.keys())
        self._unused_ahead = set()
        self._batch += 1
        return self._tables

    def _held_tables(self, w: dict, remote: dict, tokens: int) -> tuple | None:
        """_held_stack's checks, the unit's missing host experts copied, and the tables (they
        hold the held copies: they go with the unit, begin_unit)."""
        layer, E = self._layer, self.spec.num_experts
        if not ((self.cuda or HELD_AHEAD_ON_CPU) and grouped4.enabled() and self.lanes != "cpu"
                and self.stage_all and "disk" not in remote.values()
                and touches_nearly_all(self.spec, tokens * self.block_batches)):
            return None
        resident = [joined([w[f"experts.{e}.gate.weight"], w[f"experts.{e}.up.weight"]])
                    for e in range(E) if e not in remote]
        sample = self.weights.homes[self.name(layer, next(iter(remote)), "gate.weight")][1]
        if not isinstance(sample, Compressed) or None in resident or \
                not grouped4.handles(sample, self.device):      # (before copying any)
            return None
        missing = [e for e in remote if e not in self._held]
        with self._copy_span(len(missing)):
            for e in missing:
                self._copy(e)
        ws = [self._device_w(w, e) for e in range(E)]     # (held copies: their events)
        gu = [joined([d[f"experts.{e}.gate.weight"], d[f"experts.{e}.up.weight"]])
              for e, d in enumerate(ws)]
        if None in gu:
            return None
        pair = (grouped4.experts4(gu),
                grouped4.experts4([d[f"experts.{e}.down.weight"] for e, d in enumerate(ws)]))
        return None if None in pair else pair

    def _nbytes(self, e: int, layer: int | None = None) -> int:
        key = (self._layer if layer is None else layer, e)
        size = self._sizes.get(key)
        if size is None:
            size = self._sizes[key] = sum(nbytes(self.weights.homes[self.name(*key, p)][1])
                                          for p in self.parts)
        return size

    def _read(self, e: int, layer: int | None = None) -> tuple:
        """Expert e of the current unit (or `layer`) in host memory (a disk expert: read into
        fresh buffers, pinned on a GPU run); run by the reader threads too."""
        layer = self._layer if layer is None else layer
        return tuple(self.weights.read_host(self.name(layer, e, p), pinned=self.cuda,
                                            mapped=self.mapped) for p in self.parts)

    def _copy(self, e: int, host_parts: tuple | None = None) -> None:
        """Start bringing expert e of the current unit to the device (held for the block),
        from `host_parts` when already read (_read)."""
        self._held[e] = self._device_copy(self._layer, e, host_parts)

    def _device_copy(self, layer: int, e: int, host_parts: tuple | None = None) -> tuple:
        """(expert e of `layer`'s weights on the device, the event its copies end with)."""
        dev, ev = {}, None
        host = dict(zip(self.parts, host_parts or self._read(e, layer)))
        if self.cuda or HELD_AHEAD_ON_CPU:  # gate and up as one matrix: one GEMM for both
            for pair in (("gate.weight", "up.weight"), ("gate.bias", "up.bias")):
                if all(p in host for p in pair):
                    got = self.weights.fetch_rows([host[p] for p in pair], self.weight_stream,
                                                  self.compute_stream)
                    dev.update(zip((f"experts.{e}.{p}" for p in pair), got or ()))
        for p, value in host.items():       # (a CPU run's fetch hands back the host value)
            if f"experts.{e}.{p}" not in dev:
                dev[f"experts.{e}.{p}"] = self.weights.fetch(
                    self.name(layer, e, p), self.weight_stream, self.compute_stream, value)
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(self.weight_stream)
        self.stats.copied += 1
        self.stats.copy_bytes += self._nbytes(e, layer)
        return dev, ev

    def _copy_span(self, n: int, layer: int | None = None, what: str = ""):
        """A trace span over the copies of n host experts (on the weight stream on a GPU)."""
        if self.tracer is None or not n:
            return nullcontext()
        if self.staging is not None:        # the span times the copies, not the wait for
            self.staging.claim(ahead=bool(what))    # the slots' last GEMMs
        layer = self._layer if layer is None else layer
        return self.tracer.span(f"h2d experts l{layer} x{n}{what}", "expert-copies",
                                self.weight_stream if self.cuda else None)

    def _stage_copy(self, e: int, host_parts: tuple | None = None) -> None:
        """Copy expert e of the current unit from host memory into its staging slot."""
        self.staging.put_host(e, *(host_parts or self._read(e)))
        self.stats.copied += 1
        self.stats.copy_bytes += self._nbytes(e)
