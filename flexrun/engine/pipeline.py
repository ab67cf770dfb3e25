"""Executes the zig-zag block schedule: overlapped weight loads, KV cache homes, activations.

For each generation step, for each unit (embedding, layers, head), the unit's weights are
fetched once (the next unit's fetch starts before this one computes: double buffering) and
applied to every GPU batch of the block in turn.
"""
from __future__ import annotations

import sys
import traceback
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace

import torch

from flexrun.config import Policy
from flexrun.models.spec import ModelSpec
from flexrun.memory.disk import MAP_DISK, DiskTier
from flexrun.memory.storage import Arena, TieredStore, assign_tiers
from flexrun.engine import graphs as decode_graphs
from flexrun.kernels import attention as attn_triton
from flexrun.engine.activations import HostTransfers
from flexrun.engine.step_inputs import StepInputs
from flexrun.engine.unit_loads import UnitLoads
from flexrun.engine.attention import (attend, attend_range, attend_stored, host_matmul,
                                     layer_options)
from flexrun.engine.experts import TieredExperts
from flexrun.engine.kvcache import KVCache, KVSlot
from flexrun.engine.sampling import Sampler
from flexrun.engine.rows import append_tokens, prompt_logprobs
from flexrun.engine.schedule import Task, zigzag
from flexrun.engine.trace import Tracer
from flexrun.engine.batch_state import BatchState

ATTEND_FIRST_ON_CPU = False     # tests: every batch's attention before the MoE on a CPU run too


class Pipeline(HostTransfers, StepInputs, UnitLoads):
    """Runs units `units` (default: all) of a model; a pipeline stage runs a contiguous slice,
    placing its layers' KV cache and its units' activations per the policy over that slice."""
    defers_ids = True       # greedy ids reach the host a step late (_defer); not on a stage

    def __init__(self, spec: ModelSpec, model, weights: TieredStore, policy: Policy,
                 device: torch.device, dtype: torch.dtype, disk: DiskTier | None,
                 tracer: Tracer, units: range | None = None):
        self.spec, self.model, self.weights, self.policy = spec, model, weights, policy
        self.device, self.dtype, self.disk, self.tracer = device, dtype, disk, tracer
        self.units = units if units is not None else range(spec.num_units)
        tiers = ("gpu", "cpu", "disk")
        layers = [u - 1 for u in self.units if 1 <= u <= spec.num_layers]
        self.cache_tiers = {j: tiers[t] for j, t in
                            zip(layers, assign_tiers([1] * len(layers), policy.cache_split()))}
        self.act_tiers = {u: tiers[t] for u, t in
                          zip(self.units, assign_tiers([1] * len(self.units), policy.act_split()))}
        self.cuda = device.type == "cuda"
        self.maps_disk = MAP_DISK and not self.cuda     # disk weights: DiskTier.map_read
        self.acts_resident = set(self.act_tiers.values()) == {"gpu"}
        self.io = ThreadPoolExecutor(2, thread_name_prefix="flexrun-load")
        self._host_bufs: dict[tuple, torch.Tensor] = {}    # reused pinned buffers
        self._arenas, self._loads = (Arena(), Arena()), 0  # disk weight reads, CPU runs
        sys.setswitchinterval(5e-4)     # hand the GIL to I/O threads promptly
        self.compute_stream = self.weight_stream = self.store_stream = None
        self.attn_out_stream = None
        if self.cuda:
            # cuDNN's SDPA builds an execution plan for every new key length: one per decode
            # step (~80 ms each on the H100). Flash / memory-efficient kernels need none.
            torch.backends.cuda.enable_cudnn_sdp(False)
            self.compute_stream = torch.cuda.current_stream(device)
            self.weight_stream = torch.cuda.Stream(device)
            self.store_stream = torch.cuda.Stream(device)
            self.attn_out_stream = torch.cuda.Stream(device)
        self.experts = TieredExperts(spec, weights, device, dtype, policy.expert_lanes,
                                     tracer=tracer, weight_stream=self.weight_stream,
                                     compute_stream=self.compute_stream,
                                     mapped=self.maps_disk) \
            if spec.num_experts else None
        away = set().union(*(self.experts.remote_names(u - 1) for u in self.units)) \
            if self.experts is not None else set()     # routed experts load on demand
        self.unit_names = {u: [n for n in spec.unit_shapes(u) if n not in away]
                           for u in self.units}
        self.unit_tiers = {u: {weights.tier_of(n) for n in names}
                           for u, names in self.unit_names.items()}
        self.streamed = [u for u in self.units if self.unit_tiers[u] != {"gpu"}]
        # (a CPU run's disk reads into its two arenas allow one unit ahead)
        self.weights_ahead = policy.weights_ahead if self.cuda or self.maps_disk else 1
        static = policy.cuda_graphs and (self.cuda or decode_graphs.STATIC_ON_CPU)
        self.kv = KVCache(self.cache_tiers, device, dtype, disk, spec.num_kv_heads, spec.head_dim,
                          policy.cpu_attention, self.store_stream if policy.overlap else None,
                          self.io, (policy.quant_bits, policy.cache_group, policy.cache_scheme,
                                    policy.cache_window, policy.cache_sink)
                          if policy.compress_cache else None,
                          zero_fill=static or not self.cuda,   # whole-slot attention reads all
                          gpu_batches=policy.gpu_cache_batches)
        self.graphs = decode_graphs.DecodeGraphs(self, capture=self.cuda) if static else None

    # ---- one unit on one batch --------------------------------------------------------------
    def _layer(self, w: dict, layer: int, b: BatchState, prefill: bool) -> torch.Tensor:
        return self._post_attn(w, layer, *self._attention(w, layer, b, prefill))

    def _attention(self, w: dict, layer: int, b: BatchState, prefill: bool, aside: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the layer's input, its attention output) for batch b; aside: a CPU attention
        output comes back on the attention-output stream (_attend_first)."""
        h = self._get_act(b.hidden)
        pos = self._positions(b, prefill)
        # q, k, v: (b, heads, s, hd)
        tables = None if prefill else self._per_step(b, (b.time, "rope"), dict)
        q, k, v = (x.transpose(1, 2) for x in self.model.pre_attn(w, h, pos, layer, tables))
        opts = layer_options(self.spec, layer, w)
        win = opts.window
        rows, total = b.ids.shape[0], b.valid.shape[1]
        slot = self.kv.slot(layer, b.batch_no, total, rows)
        if prefill:
            attn = attend(q, k, v, self._mask(b, self.device, True, win), causal=True, opts=opts)
            if b.fork is not None:          # n samples: the prompt's KV copied to each row
                k, v = k.index_select(0, b.fork), v.index_select(0, b.fork)
            # a compressed slot's key groups leave out each row's left padding
            slot.write(k, v, 0, None if isinstance(slot, KVSlot) else b.key_start())
            return h, attn
        t0 = b.time
        host_attn = slot.on_host and (not self.cuda or self.policy.cpu_attention)
        if slot.tier == "gpu" and not slot.on_host:
            slot.write(k, v, t0)
            if isinstance(slot, KVSlot) and attn_triton.applies(q, *slot.kv):
                attn = attend_range(q, *slot.kv, *self._key_range(b), opts)
            else:                   # a 4-bit slot: the fused kernel where it applies
                attn = attend_stored(q, slot, t0 + 1, self._key_range(b), lambda: self._mask(
                    b, self.device, False, win), opts)
        elif host_attn:
            cpu = torch.device("cpu")
            # (gpt-oss's sink logits go down with q, k and v)
            q, k, v, sink = self._to_host(b.batch_no, q=q, k=k, v=v, sink=opts.sink)
            opts = replace(opts, sink=sink)
            slot.write(k, v, t0)
            with self.tracer.span(f"attn l{layer}", "cpu-attn"):
                if self._whole_slot(slot, q):
                    attn = attend_range(q, *slot.kv, *self._key_range(b), opts)
                else:
                    K, V = slot.read(t0 + 1, cpu)
                    attn = attend(q, K, V, self._mask(b, cpu, False, win), opts=opts)
            if self.cuda:
                attn = self._host_buffer("attn", b.batch_no, attn).copy_(attn)
                attn = self._attn_to_device(attn, aside)
        elif not isinstance(slot, KVSlot):  # compressed: the step's write may quantize a
            slot.write(k, v, t0)            # key group, as on the other tiers
            attn = attend_stored(q, slot, t0 + 1, self._key_range(b), lambda: self._mask(
                b, self.device, False, win), opts, pinned=self.cuda)
        else:
            K, V = slot.read(t0, self.device, pinned=self.cuda)
            attn = attend(q, torch.cat([K, k], 2), torch.cat([V, v], 2),
                          self._mask(b, self.device, False, win), opts=opts)
            slot.write(k, v, t0)
        return h, attn

    def _attend_first(self, w: dict, task: Task, batches: list[BatchState]) -> dict[int, tuple]:
        """Decode of a MoE layer with experts off the device: every batch's attention first
        ({batch: (input, attention)}), then each batch's MoE. CPU attention waits for the
        compute stream, so attention queued behind a MoE call would wait for that layer's
        expert copies, and the next layer's copies for this layer's attention."""
        layer = task.unit - 1
        if task.prefill or self.experts is None or layer not in self.experts.remote or \
                len(batches) < 2 or not (self.cuda or ATTEND_FIRST_ON_CPU) or \
                (self.graphs is not None and self.graphs.covers(task.unit)):
            return {}
        with self.tracer.span(f"s{task.step} u{task.unit} attention", "compute",
                              self.compute_stream if self.cuda else None):
            out = {i: self._attention(w, layer, b, False, aside=self.cuda)
                   for i, b in enumerate(batches) if not b.finished}
            if self.cuda:
                self.compute_stream.wait_stream(self.attn_out_stream)
        return out

    def _post_attn(self, w: dict, layer: int, h: torch.Tensor, attn: torch.Tensor):
        runner = self.experts.runner(layer) if self.experts is not None else None
        return self.model.post_attn(w, h, attn, experts=runner, layer=layer)

    def _whole_slot(self, slot, q: torch.Tensor) -> bool:
        """Whether a CPU run's decode attention reads the whole (zero-filled, batch-major) slot
        with the keys out of range masked: bf16 batched GEMMs over the slot's prefix views
        (strided batches) run ~4x slower than over whole contiguous slots (18 against 4.5 ms,
        16 rows x 32 heads x 520 keys, 2 cores), which outweighs the unused keys' work."""
        return (not self.cuda and isinstance(slot, KVSlot) and slot.tier == "gpu"
                and not slot.time_major and host_matmul(q))

    # ---- the block loop ---------------------------------------------------------------------
    def run_block(self, batches: list[BatchState], max_new_tokens: int, sampler: Sampler,
                  on_step=None) -> None:
        """Generate up to max_new_tokens for every batch of the block (zig-zag order)."""
        U = self.spec.num_units
        for bn, b in enumerate(batches):
            b.batch_no, b.time = bn, b.prompt_len
        self.begin_block(batches)
        loads: dict[int, Future] = {}       # streamed units whose weights are on their way
        w, attended = None, {}
        try:
            for task in zigzag(max_new_tokens, U, len(batches)):
                if task.first_batch:
                    if task.unit == 0 and all(b.finished for b in batches):
                        break
                    w = self._wait_load(loads.pop(task.unit, None) or
                                        self._start_load(task.unit), task.unit)
                    if self.experts is not None:    # the last unit's expert copies go
                        self.experts.begin_unit(task.unit - 1)
                        # (decode steps stage alike; a prefill may stage where decode won't)
                        self.experts.steps_follow = 0 < task.step < max_new_tokens - 1
                    self._prefetch_acts(batches, task.unit)     # ahead of the next copy
                    self._start_next(task, loads, max_new_tokens)
                    attended = self._attend_first(w, task, batches)
                    if self.experts is not None:    # behind the attention outputs' copies:
                        if attended and self.cuda:  # queued while the copy engine is busy,
                            # they landed after copies queued later (S7's H100 trace)
                            self.weight_stream.wait_stream(self.attn_out_stream)
                        self.experts.copy_ahead()
                b = batches[task.batch]
                if not b.finished:
                    with self.tracer.span(f"s{task.step} u{task.unit} b{task.batch}",
                                          "compute", self.compute_stream if self.cuda else None):
                        self._unit(w, task.unit, b, task.prefill, sampler,
                                   attended.pop(task.batch, None))
                if task.last_batch:
                    w = None
                    if task.unit == U - 1:
                        for b in batches:
                            b.time += 0 if task.prefill else 1
                        if on_step is not None:
                            on_step(task.step)
            for f in loads.values():
                f.result()
            for b in batches:
                self.flush(b)
        except BaseException as e:
            # the traceback keeps the frames below alive, and with them weights mapped from
            # offload files (DiskTier.map_read), whose disk space a mapping holds after
            # close() unlinks them; this frame's own references go in `finally`
            if self.maps_disk and self.disk is not None:
                traceback.clear_frames(e.__traceback__)
            raise
        finally:        # on an error too: a load in flight may still fill a reused buffer
            wait(list(loads.values()))
            if self.cuda:   # unconsumed copies into compute-pool buffers finish before reuse
                self.compute_stream.wait_stream(self.weight_stream)
            loads.clear()
            w = None

    def begin_block(self, batches: list[BatchState]) -> None:
        """Fresh CUDA graph inputs, and the block's GPU batch count for the expert runner (a
        last block may hold fewer)."""
        if self.graphs is not None:
            self.graphs.new_block()
        if self.experts is not None:
            self.experts.block_batches = len(batches)

    def _unit(self, w: dict, u: int, b: BatchState, prefill: bool, sampler: Sampler,
              attended: tuple | None = None) -> None:
        L = self.spec.num_layers
        if not prefill and self.graphs is not None and self.graphs.covers(u):
            return self._static_unit(w, u, b, sampler)
        if u == 0:
            ids = b.last if not prefill else b.ids if b.pre is None else b.ids[b.pre]
            h = self.model.embed(w, ids, self._positions(b, prefill), self.dtype)
        elif u <= L:
            h = self._layer(w, u - 1, b, prefill) if attended is None else \
                self._post_attn(w, u - 1, *attended)
        else:
            h = self._get_act(b.hidden)
            if prefill and b.keep_logits:
                b.logits = self.model.head(w, h).float().cpu()
            if prefill and b.prompt_lp_k is not None:
                b.prompt_lp = prompt_logprobs(self.model, w, h, b.ids if b.pre is None
                                              else b.ids[b.pre], b.prompt_lp_k)
            logits = self.model.head(w, h[:, -1])
            if prefill and b.fork is not None:
                logits = logits.index_select(0, b.fork)
            self._sample(b, logits, sampler, prefill)
            return
        b.hidden = self._put_act(u, h, b.batch_no)

    def _static_unit(self, w: dict, u: int, b: BatchState, sampler: Sampler) -> None:
        """A decode step of a GPU-resident unit through its captured graph (engine/graphs)."""
        h = None if u == 0 else self._get_act(b.hidden)
        out = self.graphs.run(w, u, b, h)
        if u == self.spec.num_units - 1:
            return self._sample(b, out, sampler, False)
        # the graph's output is overwritten by its next replay: an offloaded copy, or one sent
        # to the next pipeline stage (this stage's last unit), gets its own
        own = self.act_tiers[u] != "gpu" or u == self.units[-1]
        b.hidden = self._put_act(u, out.clone() if own else out, b.batch_no)

    def _sample(self, b: BatchState, logits: torch.Tensor, sampler: Sampler, prefill: bool):
        tok = sampler(logits, b.indices)
        picked = sampler.logprobs(logits, tok) if sampler.wants_logprobs else None
        if tok.is_cuda and self.defers_ids and picked is None:
            self._defer(b, tok, sampler)
        else:
            self.record(b, tok, sampler, picked)
        self.advance(b, prefill)

    def _defer(self, b: BatchState, tok: torch.Tensor, sampler: Sampler) -> None:
        """Keep ids sampled on the GPU there for the next step's embedding and copy them to
        the host in the background; they are appended at the batch's next sample or when the
        block ends (flush). The host thus never waits for the GPU between steps (waiting
        left the H100 idle ~1.2 ms per S3 step while the host booked the step and issued
        the next one's inputs); a batch whose rows all stopped runs one step more, unused."""
        self.flush(b)
        b.last = tok[:, None]
        buf = self._host_buffer("ids", b.batch_no, tok)     # read by the flush above
        buf.copy_(tok, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        b.pending = (buf, ev, sampler)

    def flush(self, b: BatchState) -> None:
        """Append b's deferred ids, if any (waits for their copy)."""
        if b.pending is not None:
            buf, ev, sampler = b.pending
            b.pending = None
            ev.synchronize()
            append_tokens(b, buf.tolist(), sampler)

    def record(self, b: BatchState, tok: torch.Tensor, sampler: Sampler, picked=None) -> None:
        """Append a step's sampled ids (b,) to the unfinished rows; keep them for the embedding."""
        append_tokens(b, tok.tolist(), sampler, picked)
        b.last = tok.to(self.device)[:, None]

    def advance(self, b: BatchState, prefill: bool) -> None:
        """Mark the sampled token's position valid and move the next position on."""
        t = b.prompt_len if prefill else b.time + 1
        if t < b.valid.shape[1]:
            b.valid[:, t] = True
        if not prefill:
            b.next_pos = b.next_pos + 1

    def peak_bytes(self) -> tuple[int, int]:
        """(peak GPU bytes allocated, peak resident host bytes) of this process."""
        import resource
        gpu = torch.cuda.max_memory_allocated(self.device) if self.cuda else 0
        return gpu, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.close()
        self.io.shutdown(wait=True)
        if self.experts is not None:
            self.experts.close()
        self.kv.close()
