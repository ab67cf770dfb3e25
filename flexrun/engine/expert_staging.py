"""One layer's experts laid out back to back on the compute device, for grouped GEMMs.

A layer whose experts are split over tiers has no stacked buffer of its own (only a fully
resident layer is joined at load: LlamaModel.JOINED), so running its routed experts one GEMM
each costs a handful of launches per expert (128 experts of Qwen3-MoE: ~1,000 launches per
layer and GPU batch). ExpertStaging keeps a pair of (E, 2 ffn, hidden) / (E, hidden, ffn)
buffers: each routed expert of the current unit is put in its slot once per block (a
resident one copied device to device, an off-device one copied from host memory straight
into its slot on the weight stream), and the batch's device experts run as two grouped GEMMs.

There are two such pairs: while one unit's experts compute from one, the host experts of the
next MoE unit can be copied into the other (prefetch), so their copies overlap this unit's
work instead of following it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flexrun.memory.pinned import copy_chunked
from flexrun.memory.disk import DiskRef
from flexrun.models.moe import ExpertGroup
from flexrun.models.moe_grouped import (GROUPED_MAX_BYTES, grouped_mlp, grouped_mm_works,
                                        rows_aligned)

RUNS_KEPT = 256     # sets of host experts whose coalesced copies are kept (two per layer)


@dataclass
class _Slots:
    """One pair of stacked buffers and what they hold."""
    W1: torch.Tensor | None = None
    W2: torch.Tensor | None = None
    layer: int | None = None            # the unit whose experts are (being) staged here
    staged: set[int] = field(default_factory=set)
    free: object = None                 # CUDA: the GEMMs of the unit that last used them end
    copied: object = None               # CUDA: this batch's host copies are in
    prefetched: object = None           # CUDA: the copies made ahead of the unit are in


class ExpertStaging:
    """The stacked slots of the current unit's experts on the compute device (and of the
    next MoE unit's, once prefetched)."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, device: torch.device,
                 dtype: torch.dtype, weight_stream=None, compute_stream=None):
        self.E, self.h, self.f = num_experts, hidden, ffn
        self.device, self.dtype = device, dtype
        self.weight_stream, self.compute_stream = weight_stream, compute_stream
        self.cuda = device.type == "cuda"
        self._bufs = (_Slots(), _Slots())
        self._cur = self._bufs[0]
        self._runs: dict[tuple, list] = {}      # coalesced copies of a set of host experts

    @staticmethod
    def applies(device: torch.device, dtype: torch.dtype, hidden: int, ffn: int,
                sample) -> bool:
        """Plain (not 4-bit) experts of a dtype grouped GEMMs run, with 16-byte rows."""
        return (isinstance(sample, (torch.Tensor, DiskRef)) and rows_aligned(dtype, hidden, ffn)
                and grouped_mm_works(device, dtype))

    @property
    def staged(self) -> set[int]:
        """The experts of the current unit in their slots (copies possibly in flight)."""
        return self._cur.staged

    @property
    def _other(self) -> _Slots:
        """The pair the current unit does not use (where the next unit's copies go ahead)."""
        return self._bufs[1] if self._cur is self._bufs[0] else self._bufs[0]

    @property
    def W1(self) -> torch.Tensor | None:
        return self._cur.W1

    @property
    def W2(self) -> torch.Tensor | None:
        return self._cur.W2

    def begin_unit(self, layer: int | None = None) -> None:
        """A new unit: its experts come from the slots prefetched for it, else replace the
        older unit's experts once that unit's GEMMs are done."""
        last = self._cur
        if self.cuda and last.W1 is not None:
            last.free = torch.cuda.Event()
            last.free.record(self.compute_stream)
        other = self._other
        nxt = other if other.layer == layer and layer is not None else \
            (last if last.layer is None else other)
        if nxt.layer != layer or layer is None:
            nxt.layer, nxt.staged = layer, set()
        self._cur = nxt

    def holds(self, layer: int, experts) -> bool:
        """Whether the slots the current unit does not use hold (or are receiving) these
        experts of `layer`."""
        other = self._other
        return other.layer == layer and other.staged >= set(experts)

    def prefetch(self, layer: int, host: dict[int, tuple]) -> bool:
        """Start copying `layer`'s host experts ({expert: (gate, up, down)}, pinned on a GPU
        run) into the slots the current unit does not use; False when they are in use."""
        if self.holds(layer, host):
            return False
        target = self._other
        target.layer, target.staged = layer, set()
        self._slots(target)
        with self._on_weight_stream(target):
            self._copy_host_many(target, [(e, *parts) for e, parts in host.items()])
            if self.cuda:
                target.prefetched = torch.cuda.Event()
                target.prefetched.record(self.weight_stream)
        return True

    def _slots(self, b: _Slots) -> None:
        if b.W1 is None:
            b.W1 = torch.empty(self.E, 2 * self.f, self.h, dtype=self.dtype, device=self.device)
            b.W2 = torch.empty(self.E, self.h, self.f, dtype=self.dtype, device=self.device)
            if self.cuda:   # their blocks may still be in use by the compute stream's queue
                self.weight_stream.wait_stream(torch.cuda.current_stream(self.device))

    def put_resident(self, e: int, gate: torch.Tensor, up: torch.Tensor,
                     down: torch.Tensor) -> None:
        """Copy a device expert into its slot (on the compute stream, after the last unit's
        GEMMs there)."""
        b = self._cur
        self._slots(b)
        if b.prefetched is not None:    # copies made ahead into these slots land first
            self.compute_stream.wait_event(b.prefetched)
            b.prefetched = None
        b.W1[e, :self.f].copy_(gate)
        b.W1[e, self.f:].copy_(up)
        b.W2[e].copy_(down)
        b.staged.add(e)

    def put_host(self, e: int, gate: torch.Tensor, up: torch.Tensor,
                 down: torch.Tensor) -> None:
        """Copy a host expert (pinned on a GPU run) into its slot on the weight stream."""
        self.put_host_many([(e, gate, up, down)])

    def put_host_many(self, items: list[tuple]) -> None:
        """Copy host experts [(e, gate, up, down)] into their slots on the weight stream, the
        copies coalesced where the host tensors lie back to back as the slots do
        (placement.host_expert_runs), in pieces of H2D_CHUNK bytes (one long copy would hold
        the copy engine from the activations' and the CPU lane's small copies)."""
        b = self._cur
        self._slots(b)
        with self._on_weight_stream(b):
            self._copy_host_many(b, items)
            if self.cuda:
                b.copied = torch.cuda.Event()
                b.copied.record(self.weight_stream)

    def claim(self, ahead: bool = False) -> None:
        """Make the weight stream wait now until the slots about to be written (the current
        unit's, or the other pair when copying ahead) are no longer read (no-op off CUDA)."""
        self._wait_free(self._other if ahead else self._cur)

    def _wait_free(self, b: _Slots) -> None:
        """The weight stream waits for the GEMMs that last read b (once; no-op off CUDA)."""
        if self.cuda and b.free is not None:
            self.weight_stream.wait_event(b.free)
            b.free = None

    def _on_weight_stream(self, b: _Slots):
        """The weight stream (CUDA), once the GEMMs that last read b are done."""
        if not self.cuda:
            from contextlib import nullcontext
            return nullcontext()
        self._wait_free(b)
        return torch.cuda.stream(self.weight_stream)

    def _copy_host_many(self, b: _Slots, items: list[tuple]) -> None:
        """Copy host experts [(e, gate, up, down)] into their slots: each run of tensors that
        lie back to back in host memory as their slots do goes as one copy, in pieces of
        H2D_CHUNK bytes (Qwen3-MoE: 3 copies of 3 MiB per expert otherwise; each copy issued
        from Python costs its call beside its bytes)."""
        items = sorted(items, key=lambda it: it[0])
        # a layer's host experts are the same tensors every step: their runs are worked out
        # once per slot pair (about 1 ms of host time per layer for 123 experts otherwise)
        keep = len(items) > 1 and all(t.is_contiguous() for it in items for t in it[1:])
        key = (id(b), tuple((e, g.data_ptr(), u.data_ptr(), d.data_ptr())
                            for e, g, u, d in items)) if keep else None
        runs = self._runs.get(key) if keep else None
        if runs is None:
            fh = self.f * self.h
            w1, w2 = b.W1.view(-1), b.W2.view(-1)
            pieces = [p for e, g, u, _ in items
                      for p in ((w1, e * 2 * fh, g), (w1, e * 2 * fh + fh, u))]
            pieces += [(w2, e * fh, d) for e, _, _, d in items]
            runs = [(dst[off:off + src.numel()], src) for dst, off, src in coalesce(pieces)]
            if keep:    # (not a lone expert: maybe a disk read's fresh buffers; not a copy)
                if len(self._runs) >= RUNS_KEPT:
                    self._runs.clear()
                self._runs[key] = runs
        for dst, src in runs:
            copy_chunked(dst, src)
        b.staged.update(it[0] for it in items)

    def _wait(self, copied: bool) -> None:
        """The compute stream waits for the copies made ahead of this unit, and (copied) for
        this batch's own."""
        b = self._cur
        if b.prefetched is not None:
            self.compute_stream.wait_event(b.prefetched)
            b.prefetched = None
        if copied and b.copied is not None:
            self.compute_stream.wait_event(b.copied)
            b.copied = None

    def ready(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked slots (W1, W2), once this batch's host copies are in."""
        self._wait(True)
        return self.W1, self.W2

    def run(self, x2: torch.Tensor, groups: list[ExpertGroup], copied: bool = True
            ) -> dict[int, torch.Tensor]:
        """Each staged expert's weighted output over its tokens, from grouped GEMMs over at
        most GROUPED_MAX_BYTES of workspace at a time (a long prefill runs several).
        copied: some of `groups` came from host memory in this batch (wait for the copies)."""
        self._wait(copied)
        groups = sorted(groups, key=lambda g: g.expert)     # the order offs counts in
        row_bytes = (3 * self.f + 3 * self.h) * x2.element_size()
        cap = max(1, GROUPED_MAX_BYTES // row_bytes)
        out, part, n = {}, [], 0
        for g in groups:
            if part and n + g.n > cap:
                out.update(self._grouped(x2, part))
                part, n = [], 0
            part.append(g)
            n += g.n
        if part:
            out.update(self._grouped(x2, part))
        return out

    def _grouped(self, x2: torch.Tensor, groups: list[ExpertGroup]) -> dict[int, torch.Tensor]:
        sizes = [0] * self.E
        for g in groups:
            sizes[g.expert] = g.n
        offs = torch.tensor(sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        offs = offs.pin_memory().to(self.device, non_blocking=True) if self.cuda else offs
        y = grouped_mlp(x2[torch.cat([g.rows for g in groups])], self.W1, self.W2, offs)
        y = y * torch.cat([g.weights for g in groups])[:, None]
        return dict(zip((g.expert for g in groups), y.split([g.n for g in groups])))


def coalesce(pieces: list[tuple]) -> list[tuple]:
    """[(dst, offset, src)] (dst flat, src a host tensor) with each run of pieces that follow
    each other both in dst and in one storage joined: [(dst, offset, flat src of the run)]."""
    runs: list[dict] = []
    for dst, off, src in pieces:
        flat = src.reshape(-1)                  # (a copy where src is not contiguous)
        ptr, start = flat.untyped_storage().data_ptr(), flat.storage_offset()
        r = runs[-1] if runs else None
        if r is not None and r["dst"] is dst and r["off"] + r["n"] == off and \
                r["ptr"] == ptr and r["src"].dtype == flat.dtype and \
                r["start"] + r["n"] == start:
            r["n"] += flat.numel()
            continue
        runs.append(dict(dst=dst, off=off, n=flat.numel(), src=flat, ptr=ptr, start=start))
    out = []
    for r in runs:
        src = r["src"]
        if r["n"] != src.numel():               # the run's span of the shared storage
            src = torch.empty(0, dtype=src.dtype).set_(src.untyped_storage(), r["start"],
                                                      (r["n"],))
        out.append((r["dst"], r["off"], src))
    return out
