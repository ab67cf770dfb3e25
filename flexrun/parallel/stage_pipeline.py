"""One pipeline stage of a torch.distributed run: a slice of the units in one process.

Micro-batches (the GPU batches of a block) flow through the stages. A stage splits the block's
M micro-batches into G = min(M, K) groups (K stages) and runs each group zig-zag over its
units: a unit's weights are loaded once per group and applied to every micro-batch in it, so
offloaded weights cross PCIe G times per step (FlexGen's distributed schedule), not M times.
After its last unit a micro-batch's activation is isent to the next stage while the stage
goes on computing; the receive of the next micro-batch is posted ahead (irecv) where it is
known. The last stage samples and sends each micro-batch's ids to every other stage: stage 0
embeds them in the next step, the others keep their outputs and stop flags in step. With
G >= K the next step's first group is back at stage 0 as soon as stage 0 is free, so steps
overlap; a single pass (the prefill) idles (K-1)/(K+G-1) of the time.

Every stage skips micro-batch m at step i when all its rows had stopped after step i-2 (one step
later than a single process does: every stage knows that in time without extra messages). The
extra step appends nothing, so outputs are those of the single-process run.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from flexrun.memory.storage import new_future
from flexrun.engine.batch_state import BatchState
from flexrun.engine.pipeline import Pipeline
from flexrun.engine.sampling import Sampler
from flexrun.plan.stages import split_groups


@dataclass
class Pending:
    """A posted receive: its work handle and the buffer it fills."""
    work: object
    buf: torch.Tensor

    def ready(self) -> bool:
        return self.work.is_completed()

    def get(self) -> torch.Tensor:
        self.work.wait()
        return self.buf


class LazyRecv:
    """An NCCL receive posted only when its data is needed (StageComm.lazy), after every
    receive made before it on the same channel, so they still match the sends in order."""

    def __init__(self, comm: "StageComm", buf: torch.Tensor, src: int, group):
        self.comm, self.buf, self.src, self.group = comm, buf, src, group
        self.work = None

    def post(self) -> None:
        queue = self.comm.unposted
        while self.work is None:
            first = queue.popleft()
            first.work = dist.irecv(first.buf, first.src, group=first.group)

    def ready(self) -> bool:
        return self.work is not None and self.work.is_completed()

    def get(self) -> torch.Tensor:
        self.post()
        self.work.wait()
        return self.buf


@dataclass
class StageComm:
    """Messages of one stage: activations to rank+1 on the default group, token ids from the
    last rank on `tok_group` (its own communicators, so the two streams never queue behind
    each other). `device` is where messages live: the GPU with NCCL, the CPU with gloo."""
    rank: int
    world: int
    device: torch.device
    tok_group: object
    sends: list = field(default_factory=list)
    # NCCL: receives are not posted ahead. A posted NCCL receive holds its GPU stream until
    # the peer sends, so any device-wide synchronisation on this rank meanwhile (a pinned
    # allocation, cudaFree) waits for the peer, which may be waiting for this rank: a
    # two-GPU run hung so. gloo receives do not touch the GPU.
    lazy: bool = False
    unposted: deque = field(default_factory=deque)

    @property
    def last(self) -> int:
        return self.world - 1

    def _keep(self, work, t: torch.Tensor) -> None:
        """Hold a sent tensor until its isend completes (drop the completed ones)."""
        self.sends = [s for s in self.sends if not s[0].is_completed()]
        self.sends.append((work, t))

    def send_hidden(self, h: torch.Tensor) -> None:
        h = h.to(self.device).contiguous()
        self._keep(dist.isend(h, self.rank + 1), h)

    def recv_hidden(self, shape: tuple[int, ...], dtype: torch.dtype) -> Pending:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        return Pending(dist.irecv(buf, self.rank - 1), buf)

    def send_tokens(self, tok: torch.Tensor) -> None:
        tok = tok.to(self.device, torch.int64).contiguous()
        for dst in range(self.last):
            self._keep(dist.isend(tok, dst, group=self.tok_group), tok)

    def recv_tokens(self, rows: int):
        buf = torch.empty(rows, dtype=torch.int64, device=self.device)
        if self.lazy:
            r = LazyRecv(self, buf, self.last, self.tok_group)
            self.unposted.append(r)
            return r
        return Pending(dist.irecv(buf, self.last, group=self.tok_group), buf)

    def share_from_last(self, value: torch.Tensor | None, shape, dtype) -> torch.Tensor:
        """The last rank's tensor (e.g. prompt logits) on every rank, on the CPU."""
        buf = value.to(self.device, dtype) if value is not None else torch.empty(
            shape, dtype=dtype, device=self.device)
        dist.broadcast(buf, self.last, group=self.tok_group)
        return buf.cpu()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on some rank."""
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, dist.ReduceOp.MAX, group=self.tok_group)
        return bool(t.item())

    def warm_up(self) -> None:
        """Open every channel once, in one global order (NCCL connects pairs lazily, and a
        first send/recv blocks until the peer joins: all ranks must meet them in order)."""
        pairs = [(s, s + 1, None) for s in range(self.last)]
        pairs += [(self.last, s, self.tok_group) for s in range(self.last)]
        x = torch.zeros(1, device=self.device)
        for src, dst, group in pairs:
            if self.rank == src:
                dist.send(x, dst, group=group)
            elif self.rank == dst:
                dist.recv(x, src, group=group)

    def flush(self) -> None:
        for work, _ in self.sends:
            work.wait()
        self.sends = []


class StagePipeline(Pipeline):
    """Runs units `units` of every micro-batch, trading activations and ids with the others."""
    defers_ids = False      # its block loop reads each step's ids at once (stop flags, sends)

    def __init__(self, *args, comm: StageComm, **kw):
        super().__init__(*args, **kw)
        self.comm = comm
        self.first = self.units[0] == 0
        self.last = self.units[-1] == self.spec.num_units - 1

    def run_block(self, batches: list[BatchState], max_new_tokens: int, sampler: Sampler,
                  on_step=None) -> None:
        run = _BlockRun(self, batches, max_new_tokens, sampler)
        self.begin_block(batches)
        groups = split_groups(len(batches), self.comm.world)
        try:
            for step in range(max_new_tokens):
                run.sync_tokens(step)
                if all(run.skip(step, m) for m in range(len(batches))):
                    break
                for group in groups:
                    run.group(step, group)
                if on_step is not None:
                    on_step(step)
        finally:    # the next step's load, never consumed, lands before its buffers are reused
            if self.cuda:   # (they come from the compute stream's pool: fetch_ordered)
                self.compute_stream.wait_stream(self.weight_stream)
        run.finish()


class _BlockRun:
    """The state of one block on one stage: posted receives, ids on the way, stop history."""

    def __init__(self, pipe: StagePipeline, batches: list[BatchState], gen: int,
                 sampler: Sampler):
        self.p, self.batches, self.gen, self.sampler = pipe, batches, gen, sampler
        self.comm = pipe.comm
        self.stopped: list[dict[int, bool]] = [{} for _ in batches]   # all rows stopped after step
        self.tokens: list[deque] = [deque() for _ in batches]          # (step, Pending) per m
        self.hidden: tuple[int, int, Pending] | None = None           # a receive posted ahead
        u = pipe.units
        self.order = [u[(i + 1) % len(u)] for i in range(len(u))]     # the unit to load next
        self.weights = pipe._start_load(u[0])
        for bn, b in enumerate(batches):
            b.batch_no, b.time = bn, b.prompt_len

    # ---- what every stage agrees on -----------------------------------------------------
    def skip(self, step: int, m: int) -> bool | None:
        """Micro-batch m sits out `step` (None: not known here yet)."""
        return False if step < 2 else self.stopped[m].get(step - 2)

    def take_tokens(self, m: int, upto: int, wait: bool = True) -> None:
        """Record the ids of micro-batch m's steps <= upto that have arrived (or wait for them)."""
        q, b = self.tokens[m], self.batches[m]
        while q and q[0][0] <= upto and (wait or q[0][1].ready()):
            step, pending = q.popleft()
            self.p.record(b, pending.get(), self.sampler)
            self.stopped[m][step] = b.finished

    def sync_tokens(self, step: int) -> None:
        if not self.p.last:     # every id of step-2 was sent before this stage's step-1 ended
            for m in range(len(self.batches)):
                self.take_tokens(m, step - 2)

    # ---- one group of micro-batches through this stage's units ----------------------------
    def group(self, step: int, group: range) -> None:
        """Zig-zag over the stage's units: each unit's weights once, then every live
        micro-batch of the group; a micro-batch enters at the first unit, leaves at the last."""
        p, prefill = self.p, step == 0
        live = []
        for m in group:
            self.batches[m].time = self.batches[m].prompt_len + max(step - 1, 0)
            if self.skip(step, m):
                self.stopped[m][step] = True
            else:
                live.append(m)
        if not live:
            return
        if p.experts is not None:   # the group's batches share each unit's staged experts
            p.experts.block_batches = len(live)
        last = len(p.units) - 1
        for i, u in enumerate(p.units):
            w = p._wait_load(self.weights, u)
            self.weights = p._start_load(self.order[i])
            for m in live:
                b = self.batches[m]
                if i == 0:
                    self._enter(step, m)
                with p.tracer.span(f"s{step} u{u} b{m}", "compute",
                                   p.compute_stream if p.cuda else None):
                    p._unit(w, u, b, prefill, self.sampler)
                if i == last:
                    self._leave(step, m)
            w = None

    def _enter(self, step: int, m: int) -> None:
        """Micro-batch m's input at this stage: sampled ids (stage 0) or an activation."""
        if self.p.first:
            if step > 0:
                self.take_tokens(m, step - 1)       # the ids to embed
            return
        self.batches[m].hidden = self._receive(step, m)
        self._post_next(step, m)

    def _leave(self, step: int, m: int) -> None:
        """Send micro-batch m on: its ids to every stage (last), else its activation."""
        b = self.batches[m]
        if self.p.last:
            self.comm.send_tokens(b.last[:, 0])
            self.stopped[m][step] = b.finished
            return
        self.comm.send_hidden(self.p._get_act(b.hidden))
        b.hidden = None
        self.p.advance(b, step == 0)
        self.tokens[m].append((step, self.comm.recv_tokens(b.ids.shape[0])))

    def _shape(self, step: int, m: int) -> tuple[int, int, int]:
        b = self.batches[m]
        return (b.ids.shape[0], b.prompt_len if step == 0 else 1, self.p.spec.hidden_size)

    def _receive(self, step: int, m: int) -> torch.Tensor:
        if self.hidden is None:
            pending = self.comm.recv_hidden(self._shape(step, m), self.p.dtype)
        else:
            s, mm, pending = self.hidden
            assert (s, mm) == (step, m), f"posted a receive for {(s, mm)}, need {(step, m)}"
            self.hidden = None
        return pending.get().to(self.p.device, non_blocking=True)

    def _post_next(self, step: int, m: int) -> None:
        """Post the receive of the next micro-batch this stage will run, if known already
        (not on NCCL: StageComm.lazy)."""
        if self.comm.lazy:
            return
        M = len(self.batches)
        for k in range(m + 1, m + 1 + M):
            s, mm = step + k // M, k % M
            if s >= self.gen:
                return
            self.take_tokens(mm, s - 2, wait=False)
            sk = self.skip(s, mm)
            if sk is None:
                return
            if not sk:
                self.hidden = (s, mm, self.comm.recv_hidden(self._shape(s, mm), self.p.dtype))
                return

    def finish(self) -> None:
        self.weights.result()
        self.weights = new_future(None)
        for m in range(len(self.batches)):
            self.take_tokens(m, self.gen)
        self.comm.flush()
        for b in self.batches:
            if b.keep_logits:
                shape = (b.ids.shape[0], b.prompt_len, self.p.spec.vocab_size)
                b.logits = self.comm.share_from_last(b.logits, shape, torch.float32)
