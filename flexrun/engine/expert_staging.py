"""One layer's experts laid out back to back on the compute device, for grouped GEMMs.

A layer whose experts are split over tiers has no stacked buffer of its own (only a fully
resident layer is joined at load: LlamaModel.JOINED), so running its routed experts one GEMM
each costs a handful of launches per expert (128 experts of Qwen3-MoE: ~1,000 launches per
layer and GPU batch). ExpertStaging keeps a pair of (E, 2 ffn, hidden) / (E, hidden, ffn)
buffers: each routed expert of the current unit is put in its slot once per block (a
resident one copied device to device, an off-device one copied from host memory straight
into its slot on the weight stream), and the batch's device experts run as two grouped GEMMs.
"""
from __future__ import annotations

import torch

from flexrun.memory.pinned import H2D_CHUNK
from flexrun.memory.disk import DiskRef
from flexrun.models.moe import (GROUPED_MAX_BYTES, ExpertGroup, grouped_mlp,
                                grouped_mm_works, rows_aligned)


class ExpertStaging:
    """The stacked slots of the current unit's experts on the compute device."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, device: torch.device,
                 dtype: torch.dtype, weight_stream=None, compute_stream=None):
        self.E, self.h, self.f = num_experts, hidden, ffn
        self.device, self.dtype = device, dtype
        self.weight_stream, self.compute_stream = weight_stream, compute_stream
        self.cuda = device.type == "cuda"
        self.W1 = self.W2 = None
        self.staged: set[int] = set()
        self._free = None           # CUDA: the last unit's GEMMs are done with the slots
        self._copied = None         # CUDA: this batch's host copies are in

    @staticmethod
    def applies(device: torch.device, dtype: torch.dtype, hidden: int, ffn: int,
                sample) -> bool:
        """Plain (not 4-bit) experts of a dtype grouped GEMMs run, with 16-byte rows."""
        return (isinstance(sample, (torch.Tensor, DiskRef)) and rows_aligned(dtype, hidden, ffn)
                and grouped_mm_works(device, dtype))

    def begin_unit(self) -> None:
        """A new unit: its experts replace the last unit's once those GEMMs are done."""
        self.staged = set()
        if self.cuda and self.W1 is not None:
            self._free = torch.cuda.Event()
            self._free.record(self.compute_stream)

    def _slots(self) -> None:
        if self.W1 is None:
            self.W1 = torch.empty(self.E, 2 * self.f, self.h, dtype=self.dtype,
                                  device=self.device)
            self.W2 = torch.empty(self.E, self.h, self.f, dtype=self.dtype, device=self.device)
            if self.cuda:   # their blocks may still be in use by the compute stream's queue
                self.weight_stream.wait_stream(torch.cuda.current_stream(self.device))

    def put_resident(self, e: int, gate: torch.Tensor, up: torch.Tensor,
                     down: torch.Tensor) -> None:
        """Copy a device expert into its slot (on the compute stream, after the last unit's
        GEMMs there)."""
        self._slots()
        self.W1[e, :self.f].copy_(gate)
        self.W1[e, self.f:].copy_(up)
        self.W2[e].copy_(down)
        self.staged.add(e)

    def put_host(self, e: int, gate: torch.Tensor, up: torch.Tensor,
                 down: torch.Tensor) -> None:
        """Copy a host expert (pinned on a GPU run) into its slot on the weight stream, in
        pieces of H2D_CHUNK bytes (one long copy would hold the copy engine from the
        activations' and the CPU lane's small copies)."""
        self._slots()
        if not self.cuda:
            return self.put_resident(e, gate, up, down)
        with torch.cuda.stream(self.weight_stream):
            if self._free is not None:
                self.weight_stream.wait_event(self._free)
                self._free = None
            for dst, src in ((self.W1[e, :self.f], gate), (self.W1[e, self.f:], up),
                             (self.W2[e], down)):
                d, s = dst.reshape(-1), src.reshape(-1)
                step = max(1, H2D_CHUNK // s.element_size())
                for i in range(0, s.numel(), step):
                    d[i:i + step].copy_(s[i:i + step], non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(self.weight_stream)
        self.staged.add(e)

    def ready(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked slots (W1, W2), once this batch's host copies are in."""
        if self._copied is not None:
            self.compute_stream.wait_event(self._copied)
            self._copied = None
        return self.W1, self.W2

    def run(self, x2: torch.Tensor, groups: list[ExpertGroup], copied: bool = True
            ) -> dict[int, torch.Tensor]:
        """Each staged expert's weighted output over its tokens, from grouped GEMMs over at
        most GROUPED_MAX_BYTES of workspace at a time (a long prefill runs several).
        copied: some of `groups` came from host memory in this batch (wait for the copies)."""
        if copied and self._copied is not None:
            self.compute_stream.wait_event(self._copied)
            self._copied = None
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
