"""CUDA graphs for the decode step of GPU-resident units.

A decode step launches ~20 small kernels per unit, and at decode batch sizes the host's
dispatch can set the pace: OPT-6.7B at batch 32 on H100 machines took 12-25 ms per step eagerly
(the slower hosts ~0.6 ms of dispatch per layer) and 10-13 ms replayed, against a 7.4 ms HBM
floor. A unit whose weights and KV slot live on the GPU is therefore captured once per (unit,
GPU batch) and replayed at every later step.

A captured step cannot change shape from one step to the next, so it is written as a *static*
step: the new key/value goes to a cache index held in a device tensor, and attention takes each
row's range of keys from device tensors too (`StepInputs`, `attention.attend_range`). Slots are
zero-filled when made, so keys outside a range are finite even where a fallback masks them.
The same static step runs eagerly (no graph) on a CPU run when `STATIC_ON_CPU` is set, which
lets CPU tests check its tokens against the plain run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from flexrun.memory.storage import parts
from flexrun.engine.attention import PLAIN, attend_range, layer_options
from flexrun.models.moe_grouped import grouped_mm_capturable
from flexrun.models.spec import AttentionOptions

STATIC_ON_CPU = False   # tests: run the static decode step eagerly on a CPU run
# without grouped GEMMs (models/moe_grouped.grouped_experts), a captured MoE step runs every expert
# over every row (it cannot wait for the routing): E/k times the expert FLOPs, hidden while
# a decode GEMM reads its weights (memory bound) up to about this many rows per GPU batch;
# larger batches run the per-expert loop eagerly
MOE_GRAPH_ROWS = 64


@dataclass
class StepInputs:
    """One GPU batch's decode-step inputs, at the fixed addresses the graphs read them from."""
    ids: torch.Tensor           # (b, 1) long: the token fed in
    pos: torch.Tensor           # (b, 1) long: its position
    t: torch.Tensor             # (1,) long: its cache index, the last key attended to
    start: torch.Tensor         # (b,) long: each row's first key (after its left padding)
    stamp: tuple | None = None  # (block, cache index) these values are for

    @classmethod
    def new(cls, rows: int, device: torch.device) -> "StepInputs":
        z = torch.zeros((rows, 1), dtype=torch.long, device=device)
        return cls(z, z.clone(), torch.zeros(1, dtype=torch.long, device=device),
                   torch.zeros(rows, dtype=torch.long, device=device))

    def update(self, b, stamp: tuple) -> None:
        """Load batch b's values for the step at its cache index b.time (device-side work):
        a row's keys are [b.key_start(), time]."""
        self.ids.copy_(b.last, non_blocking=True)
        self.pos.copy_(b.next_pos[:, None], non_blocking=True)
        self.t.fill_(b.time)
        self.start.copy_(b.key_start())
        self.stamp = stamp


def static_layer(model, w: dict, h: torch.Tensor, s: StepInputs, K: torch.Tensor,
                 V: torch.Tensor, opts: AttentionOptions = PLAIN, layer: int | None = None
                 ) -> torch.Tensor:
    """One decoder layer's decode step with shapes that do not depend on the step: k/v are
    written at cache index s.t of the batch-major slot (K, V: (b, kv_heads, T, hd))."""
    q, k, v = (x.transpose(1, 2) for x in model.pre_attn(w, h, s.pos, layer))
    K.index_copy_(2, s.t, k)
    V.index_copy_(2, s.t, v)
    return model.post_attn(w, h, attend_range(q, K, V, s.start, s.t, opts), layer=layer)


@dataclass
class _Graph:
    graph: object               # torch.cuda.CUDAGraph
    inp: torch.Tensor | None    # static input (None: the embedding reads StepInputs.ids)
    out: torch.Tensor           # static output
    deps: tuple                 # what the capture baked in; a change means capture again


class DecodeGraphs:
    """Captured decode steps of a Pipeline's GPU-resident units, per (unit, GPU batch)."""

    def __init__(self, pipe, capture: bool):
        self.pipe, self.capture = pipe, capture
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.steps: dict[int, StepInputs] = {}
        self.block = 0
        self.runs = self.captures = 0   # static unit steps run, graphs captured
        self.last_stamp = self.capturing = None     # the step last run / capturing graphs
        if capture:
            self.stream = torch.cuda.Stream(pipe.device)
            self.pool = torch.cuda.graph_pool_handle()

    def covers(self, u: int) -> bool:
        """Unit u's decode step can be static: all its weights on the compute device and, for
        a layer, a dense KV slot there (a compressed cache is read through its own code)."""
        p = self.pipe
        if p.unit_tiers[u] != {"gpu"}:
            return False
        if 1 <= u <= p.spec.num_layers and p.spec.is_moe(u - 1):
            if p.experts.remote_names(u - 1):
                return False    # routed experts come on demand
            grouped = not p.policy.compress_weight and grouped_mm_capturable(p.device, p.dtype)
            if not grouped and p.policy.gpu_batch_size > MOE_GRAPH_ROWS:
                return False    # without grouped GEMMs a graph runs every expert
        if 1 <= u <= p.spec.num_layers:
            return p.cache_tiers[u - 1] == "gpu" and p.kv.quant is None
        return True

    def new_block(self) -> None:
        """A new block starts: every batch's step inputs must be loaded again."""
        self.block += 1

    def _inputs(self, b) -> StepInputs:
        rows = b.ids.shape[0]
        s = self.steps.get(b.batch_no)
        if s is None or s.ids.shape[0] != rows:
            s = self.steps[b.batch_no] = StepInputs.new(rows, self.pipe.device)
        stamp = (self.block, b.time)
        if s.stamp != stamp:
            s.update(b, stamp)
        return s

    def run(self, w: dict, u: int, b, h: torch.Tensor | None) -> torch.Tensor:
        """Unit u's decode step for batch b: h is the unit's input (None for the embedding);
        returns its output (the logits for the head)."""
        p, s = self.pipe, self._inputs(b)
        L = p.spec.num_layers
        self.runs += 1
        if u == 0:
            def fn(_):
                return p.model.embed(w, s.ids, s.pos, p.dtype)
            extra = ()
        elif u <= L:
            slot = p.kv.slot(u - 1, b.batch_no, b.valid.shape[1], b.ids.shape[0])
            K, V = slot.kv
            opts = layer_options(p.spec, u - 1, w)

            def fn(x):
                return static_layer(p.model, w, x, s, K, V, opts, u - 1)
            extra = (K.data_ptr(), V.data_ptr(), K.shape)
        else:
            def fn(x):
                return p.model.head(w, x[:, -1])
            extra = ()
        if not self.capture:
            return fn(h)
        deps = (id(s), tuple(t.data_ptr() for x in w.values() for t in parts(x)),
                None if h is None else (tuple(h.shape), h.dtype)) + extra
        stamp = (self.block, b.time - b.prompt_len)     # the step, the same for every batch
        first = stamp != self.last_stamp
        self.last_stamp = stamp
        g = self.graphs.get((u, b.batch_no))
        if g is not None and g.deps == deps:
            if h is not None and h is not g.inp:
                g.inp.copy_(h)
            g.graph.replay()
            return g.out
        if self.capturing != stamp:
            # the graphs share one memory pool, which is safe only while they replay in the
            # order they were captured (a graph's output never lies in the scratch memory of
            # one captured earlier and replayed before its reader): any change drops them
            # all, and they are captured again from the first unit of a step, in step order
            if self.graphs:
                self._reset()
            if not first:
                return fn(h)
            self.capturing = stamp
        g = self._capture(fn, h, deps)
        self.graphs[(u, b.batch_no)] = g
        return g.out

    def _reset(self) -> None:
        self.graphs.clear()
        self.pool = torch.cuda.graph_pool_handle()     # the old one may still be releasing

    def _capture(self, fn, h: torch.Tensor | None, deps: tuple) -> _Graph:
        """Run fn once eagerly on the capture stream (this step's result; it also warms up
        cuBLAS and compiles Triton kernels there), then capture it. The input is the previous
        unit's static output where there is one, so replays chain without copies."""
        inp = None
        if h is not None:
            chained = any(h is g.out for g in self.graphs.values())
            inp = h if chained else h.clone()
        self.captures += 1
        cur = torch.cuda.current_stream(self.pipe.device)
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            now = fn(inp)
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                out = fn(inp)
            finally:
                graph.capture_end()
            out.copy_(now)
        cur.wait_stream(self.stream)
        return _Graph(graph, inp, out, deps)

    def close(self) -> None:
        self.graphs.clear()
        self.steps.clear()
