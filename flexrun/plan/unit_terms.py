"""Per-unit time terms: for one unit (embedding, decoder layer, dense or MoE, head) and one
step of a block, the seconds each resource spends, as linear expressions in the placement
fractions (wg..ad: weights/cache/activations on gpu/cpu/disk). docs/costmodel.md has the
formulas; costmodel.py evaluates them for a policy.
"""
from __future__ import annotations

import dataclasses
import math

from flexrun.config import FlexrunError, Policy
from flexrun.memory.disk import MAP_DISK
from flexrun.memory.pinned import H2D_CHUNK
from flexrun.models.moe import grouped_fits, plain_experts, touches_nearly_all
from flexrun.models.spec import ModelSpec
from flexrun.plan.cost_types import Lin, Workload, add_exprs, lin_expr
from flexrun.plan.footprint import (is_compressible, kv_block_nbytes, kv_step_nbytes, numel,
                                   streams_whole_units, weight_bytes)
from flexrun.plan.hardware import HardwareProfile, layer_kind
from flexrun.plan.moe_cost import cpu_lane_bps, moe_layer

MMAP_MAX = 32 << 20        # glibc's largest mmap threshold: bigger tensors are fresh mappings
# decode attention over a 4-bit cache against a dense one, per dense byte, for profiles that
# lack the measured rate (cpu_qattn_bw / gpu_qattn_bw): on the CPU 13-15x slower
# (timing.qattn_bw against attn_bw on the 2-core VM, fp16 and fp32, at 256 MB); on a GPU the
# fused kernel reads 4.5 of every 16 bits but dequantizes each value in registers: taken as
# the dense rate until measured; where it does not apply (8-bit codes, head dims such as 80 or
# 96) the read + SDPA path moves ~8.5 bytes per value against a dense cache's 2 (estimated)
QATTN_SLOWDOWN = {"cpu": 13.0, "cuda": 1.0, "cuda, unfused": 4.0}


class UnitTerms:
    """Rates and sizes shared by the terms of one (spec, policy shape, profile, workload)."""

    def __init__(self, spec: ModelSpec, policy: Policy, prof: HardwareProfile, wl: Workload,
                 cuda: bool, elem: int, disk_cached: bool):
        self.spec, self.p, self.prof, self.wl = spec, policy, prof, wl
        self.cuda, self.e = cuda, elem
        if cuda and None in (prof.h2d_pinned, prof.gpu_flops_prefill, prof.gpu_mem_bw):
            raise FlexrunError(f"hardware profile {prof.device_name!r} has no GPU measurements: "
                               "pass a profile made with `flexrun profile --device cuda`")
        if not cuda and None in (prof.cpu_flops_decode, prof.cpu_flops_prefill):
            raise FlexrunError(f"hardware profile {prof.device_name!r} has no CPU GEMM rates: "
                               "pass a profile made with `flexrun profile --device cpu`")
        inf = math.inf
        self.h2d, self.d2h = (prof.h2d_pinned, prof.d2h_pinned) if cuda else (inf, inf)
        self.h2d_pg, self.d2h_pg = (prof.h2d_pageable, prof.d2h_pageable) if cuda else (inf, inf)
        self.h2d_w = self.h2d if policy.pin_weights else self.h2d_pg
        # reads hit the page cache when cached; a CPU run reads into new tensors, and those
        # above glibc's largest mmap threshold are fresh mappings that pay page faults
        self.disk_r = (prof.disk_read_cached if disk_cached else None) or prof.disk_read
        self.disk_r_new = (prof.disk_read_cached_fresh if disk_cached and not cuda else None) \
            or self.disk_r
        self.disk_w = (prof.disk_read_cached if disk_cached else None) or prof.disk_write
        # a CPU run maps its disk weights from the page cache (disk.DiskTier.map_read)
        self.weight_r = (prof.disk_map_cached if disk_cached and not cuda and MAP_DISK
                         else None) or self.disk_r
        self.mem_bw = prof.gpu_mem_bw if cuda else prof.cpu_mem_bw
        self.cpu_attn_bw = prof.cpu_attn_bw or prof.cpu_mem_bw
        # share of its own rate that CPU attention keeps while weights stream in
        shared = prof.cpu_attn_bw_with_h2d
        self.attn_share = min(1.0, shared / self.cpu_attn_bw) if shared and cuda else 1.0
        self.attn_call_s = (prof.cpu_attn_call_s or 0.0) if cuda else 0.0
        self.attn_bw = (prof.gpu_attn_bw or prof.gpu_mem_bw) if cuda else self.cpu_attn_bw
        # attention over a 4-bit cache dequantizes it first: dense-equivalent bytes/s, from
        # the profile, else the dense rate over the slowdown QATTN_SLOWDOWN names
        self.qattn_cpu = prof.cpu_qattn_bw or self.cpu_attn_bw / QATTN_SLOWDOWN["cpu"]
        hd = spec.head_dim      # kernels/qattention.py: 4-bit codes, a power-of-2 head dim
        fused = policy.quant_bits == 4 and 16 <= hd <= 256 and hd & (hd - 1) == 0
        self.qattn_dev = ((prof.gpu_qattn_bw or self.attn_bw / QATTN_SLOWDOWN["cuda"]) if fused
                          else self.attn_bw / QATTN_SLOWDOWN["cuda, unfused"]) if cuda \
            else self.qattn_cpu
        self.flops_pre = prof.gpu_flops_prefill if cuda else prof.cpu_rates(elem)[1]
        self.overhead = (prof.gpu_unit_overhead if cuda else prof.cpu_unit_overhead) or 0.0
        # an eager decoder layer's host time per GPU batch, dense and MoE layers (the
        # engine's own layers at tiny sizes: cli/layer_calls.py); else the tiny unit's floor
        calls = (prof.gpu_layer_calls or {}) if cuda else {}
        w4, kv4 = policy.compress_weight, policy.compress_cache
        self.layer_call = {moe: max(self.overhead, calls.get(layer_kind(moe, w4, kv4), 0.0))
                           for moe in (False, True)}
        # per unit kind (embed, layer, head, dense layer among MoE ones): stored bytes, GEMM
        # parameters, compressed params
        self.unit_bytes, self.unit_read, self.unit_params, self.unit_qparams = [], [], [], []
        self.unit_qbytes = []
        moe_j = spec.first_moe_layer if spec.num_experts else None
        dense_j = next((j for j in range(spec.num_layers) if not spec.is_moe(j)), 0)
        layer_u = 1 if moe_j is None else moe_j + 1
        for kind, u in enumerate((0, layer_u, spec.num_layers + 1, dense_j + 1)):
            shapes = spec.unit_shapes(u)
            sizes = [weight_bytes(n, s, elem, policy) for n, s in shapes.items()]
            self.unit_bytes.append(sum(sizes))
            self.unit_read.append(sum(sizes) / self.weight_r)
            skip = ("embed.tokens", "embed.positions") if kind == 0 else ()
            self.unit_params.append(sum(numel(s) for n, s in shapes.items()
                                        if len(s) == 2 and n not in skip))
            squeezed = {n: s for n, s in shapes.items()
                        if policy.compress_weight and is_compressible(n, s)}
            self.unit_qparams.append(sum(numel(s) for s in squeezed.values()))
            self.unit_qbytes.append(sum(weight_bytes(n, s, elem, policy)
                                        for n, s in squeezed.items()))
        # decode-sized GEMMs multiply the 4-bit codes directly (dequant_triton.linear4)
        self.w4 = (prof.gpu_w4_bw, prof.gpu_w4_flops) if cuda and prof.gpu_w4_bw \
            and prof.gpu_w4_flops else None
        self.moe = moe_layer(spec, policy, elem)
        self.expert_bw = prof.gpu_expert_bw if cuda else None   # grouped expert GEMMs
        self.h2d_call = (prof.h2d_call_s or 0.0) if cuda else 0.0  # per host->GPU copy
        self.cpu_lane = cpu_lane_bps(policy, prof, cuda)    # MoE: CPU expert GEMMs

    def read_s(self, nbytes: float, parts: int = 1) -> float:
        """Seconds to read nbytes (in `parts` equal tensors) from the disk tier to host."""
        return nbytes / (self.disk_r_new if nbytes / parts > MMAP_MAX else self.disk_r)

    def io(self, nbytes: float, cpu: str, disk: str, load: bool, pinned: bool = True) -> Lin:
        """Seconds to move nbytes between the compute device and the cpu / disk tier."""
        link = (self.h2d if pinned else self.h2d_pg) if load else \
            (self.d2h if pinned else self.d2h_pg)
        return {cpu: nbytes / link,
                disk: nbytes / link + nbytes / (self.disk_r if load else self.disk_w)}

    def unit_terms(self, kind: int, prefill: bool, moe: bool = True) -> dict[str, Lin]:
        """Terms of one unit (0 embed, 1 layer, 2 head, 3 a dense layer of a MoE model) for
        one step of the whole block; moe False: a MoE layer as if dense (every weight moves
        and multiplies)."""
        s, p, e, cuda = self.spec, self.p, self.e, self.cuda

        def gemm(rows_: int, params: int, on_gpu: bool) -> float:
            return self.prof.gemm_time(rows_, params, on_gpu, e)
        b, k, P = p.gpu_batch_size, p.num_gpu_batches, self.wl.prompt_len
        rows = b * P if prefill else b
        wb = self.unit_bytes[kind]
        weights = {"wc": wb / self.h2d_w, "wd": self.unit_read[kind] + wb / self.h2d_w}
        link = lin_expr(wc=wb / self.h2d_w, wd=wb / self.h2d_w)     # host->GPU copies only
        comp, dense = self._weight_math(kind, rows if kind != 2 else b)
        if kind == 1 and moe and self.moe is not None:
            return self._moe_terms(prefill, rows, comp["1"], dense)
        if kind in (0, 2):                  # embedding gather / head GEMM on the last token
            comp["1"] += k * (gemm(rows, dense, cuda) + 2 * rows * s.hidden_size
                              * e / self.mem_bw if kind == 0 else gemm(b, dense,
                              cuda) + 4 * b * s.vocab_size / self.mem_bw)
            return {"compute": self._floor(comp, prefill, kind), "weights": weights,
                    "link": link}
        misc = rows * (12 * s.hidden_size + 3 * s.ffn_dim) * e / self.mem_bw  # norms, adds..
        comp["1"] += k * (gemm(rows, dense, cuda) + misc)
        t_avg = P if prefill else P + self.wl.gen_len / 2.0    # keys of an average step
        kv = kv_block_nbytes(s, p, e, t_avg)                   # the block's keys + values
        new = kv_step_nbytes(s, p, e, P + self.wl.gen_len)     # this step's keys + values
        # seconds of decode attention over the block's cache on the device / on the host
        # (a 4-bit cache at its dense size over the dequantize-then-attend rates)
        if p.compress_cache:
            dense_kv = kv_block_nbytes(s, dataclasses.replace(p, compress_cache=False), e, t_avg)
            dev_s, host_s = dense_kv / self.qattn_dev, dense_kv / self.qattn_cpu
        else:
            dev_s, host_s = kv / self.attn_bw, kv / self.cpu_attn_bw
        g = p.gpu_cache_share       # gpu_cache_batches: on the device, attended there
        if g and not prefill:
            comp["1"] += g * dev_s
        kv, new, rest = kv * (1 - g), new * (1 - g), k - p.gpu_cache_batches
        dev_s, host_s = dev_s * (1 - g), host_s * (1 - g)
        load: Lin = {}
        host_mem: Lin = {}
        if prefill:
            comp["1"] += k * 4.0 * b * P * P * s.num_heads * s.head_dim / self.flops_pre
            store = self.io(kv, "cc", "cd", False) if cuda else {"cd": kv / self.disk_w}
        elif not cuda or p.cpu_attention:   # attention where the cache lives (host memory)
            load, store = {"cd": kv / self.disk_r}, {"cd": new / self.disk_w}
            if not cuda:
                comp["1"] += host_s
                if not p.compress_cache:    # the in-memory share reads whole slots (P + n)
                    whole = kv_block_nbytes(s, p, e, P + self.wl.gen_len) * (1 - g)
                    comp = add_exprs(comp, {"cg": (whole - kv) / self.attn_bw})
            else:                           # ship q/k/v of the new token and the output back
                ship = b * rest * (2 * s.num_heads * s.head_dim + 2 * s.kv_dim) * e / self.h2d
                host = host_s + ship + rest * self.attn_call_s
                link = add_exprs(link, {"cc": ship, "cd": ship})
                comp = add_exprs(comp, {"cg": dev_s, "cc": host, "cd": host})
                # while the weight copy runs (the first wb/h2d seconds) attention goes at
                # attn_share of its rate: the unit lasts at least the attention time plus
                # (1 - attn_share) of the weight copy time
                slow = (1.0 - self.attn_share) * wb / self.h2d_w if rest else 0.0
                host_mem = {"cc": host, "cd": host, "wc": slow, "wd": slow}
        else:                               # bring the prefix to the GPU, attend there
            comp["1"] += dev_s
            load, store = self.io(kv, "cc", "cd", True), self.io(new, "cc", "cd", False)
            link = add_exprs(link, {"cc": kv / self.h2d, "cd": kv / self.h2d})
        act = b * k * (P if prefill else 1) * s.hidden_size * e
        if cuda:
            act_in, act_out = (self.io(act, "ac", "ad", ld, False) for ld in (True, False))
            link = add_exprs(link, {"ac": act / self.h2d_pg, "ad": act / self.h2d_pg})
        else:
            act_in, act_out = {"ad": self.read_s(act, k)}, {"ad": act / self.disk_w}
        return {"compute": self._floor(comp, prefill, kind), "weights": weights,
                **{name: add_exprs(lin_expr(), t) for name, t in (
                    ("cache_load", load), ("cache_store", store), ("act_load", act_in),
                    ("act_store", act_out), ("host_mem", host_mem), ("link", link))}}

    def _moe_terms(self, prefill: bool, rows: int, q_math: float, params: int
                   ) -> dict[str, Lin]:
        """A MoE layer: only the experts the block's tokens touch move (once per block) and
        compute, each over its share of the rows; host experts go over the copy lane and the
        CPU lane at once (cpu_lane bytes/s), or the CPU lane alone. q_math, params: the
        layer's compressed-weight math and plain GEMM parameters (_weight_math)."""
        m, k = self.moe, self.p.num_gpu_batches
        stages_all = self._stages_all(rows)
        # staging every expert copies each host one, touched or not
        moved = 1.0 if stages_all else m.moved_share(rows * k)
        wb = self.unit_bytes[1] * moved
        dense_b = self.unit_bytes[1] * m.dense_bytes / (m.dense_bytes
                                                        + m.experts * m.expert_bytes)
        exp_b, h2d, cpu, lanes = wb - dense_b, self.h2d_w, self.cpu_lane, self.p.expert_lanes
        # an expert copied serves the block's every batch; on the CPU lane it is computed
        # again in each batch that routes to it: `uses` batches of the k on average
        uses = m.uses(rows, k)
        # each copy has a fixed cost (h2d_call_s): staged all at once, a layer's host experts
        # lie as their slots do and cross as two runs in H2D_CHUNK pieces; routed one by one,
        # each crosses as expert_copies copies
        if stages_all:
            calls = (exp_b / H2D_CHUNK + 2) * self.h2d_call
        else:
            calls = m.touched(rows * k) * m.expert_copies * self.h2d_call
        if cpu and lanes == "cpu":      # the dense part still crosses the link
            wc, copied = max(dense_b / h2d, uses * exp_b / cpu), dense_b / h2d
        elif cpu and lanes == "auto" and not stages_all:
            # both lanes busy until they end together
            wc = copied = max(dense_b / h2d, wb / (h2d + cpu / uses)) + \
                calls * h2d / (h2d + cpu / uses)
        else:
            wc = copied = wb / h2d + calls
        terms = self.unit_terms(1, prefill, moe=False)     # then the MoE differences
        terms["weights"] = lin_expr(wc=wc, wd=self.unit_read[1] * moved + wb / h2d + calls)
        # the dense terms count every expert's bytes on the link: swap in the moved ones
        base = self.unit_bytes[1] / h2d
        terms["link"] = add_exprs(terms["link"], lin_expr(wc=copied - base,
                                                          wd=wb / h2d + calls - base))
        n, per = m.expert_rows(rows)
        gemm = lambda r, w: self.prof.gemm_time(r, w, self.cuda, self.e)   # noqa: E731
        all_experts = m.experts * m.expert_params
        plain = 0.0
        q = self.unit_qparams[1]
        if q:       # the 4-bit math of the dense terms covers every expert: the touched only
            plain -= (1 - n / m.experts) * all_experts / q * q_math
        if params >= all_experts and (not q or params == self.unit_params[1]):
            # the experts multiply as plain GEMMs: each touched one over its rows; in the
            # grouped GEMMs (staged or resident experts) at least at the profile's rate of
            # reading every touched expert's weights once per call
            experts_s = n * gemm(max(int(round(per)), 1), m.expert_params)
            if self.expert_bw and not q and self._grouped(rows):
                experts_s = max(experts_s, n * m.expert_params * self.e / self.expert_bw)
            plain += k * (gemm(rows, params - all_experts) - gemm(rows, params) + experts_s)
        terms["compute"] = add_exprs(terms["compute"], lin_expr(plain))
        if self.cuda and not self._grouped(rows):
            # the per-expert route (models/moe.moe_mlp's loop over the routed experts: a
            # gather, the GEMMs and a scatter each) launches about a tiny unit's kernels per
            # touched expert: the host's launches, not the GPU, bound the call (S7's H200
            # prefill: ~30 ms per 64 x 512-row call over 128 experts)
            c = terms["compute"]
            c["1"] = max(c.get("1", 0.0), k * n * self.overhead)
        call = self.prof.gpu_w4_expert_call_s if self.p.compress_weight else None
        if self.cuda and not prefill and call and self._graphed_share(False) < 1 and \
                not self._grouped(rows):
            # 4-bit experts go expert by expert unless grouped (all resident, or the block
            # touching nearly all: kernels/grouped4.py): each GPU batch waits for its routing
            # counts on the host, then for the launches of each touched expert (S6q's H100
            # trace: 3.1 ms per 128-row batch)
            terms["compute"] = add_exprs(terms["compute"],
                                         lin_expr(k * (self.overhead + n * call)))
        elif self.cuda and not prefill and not self._grouped(rows):
            # routed expert by expert (models/moe.moe_mlp's runner route): the call waits for
            # the routing counts on the host, so its launches no longer run ahead of the GPU
            # and cost as an eager unit's do, per GPU batch, where experts are off the device
            sync = k * self.overhead
            terms["compute"] = add_exprs(terms["compute"], {"wc": sync, "wd": sync})
        if self.cuda:   # the touched experts' compute may undercut the layer calls' floor
            terms["compute"] = self._floor(terms["compute"], prefill, 1)
        return terms

    def _grouped(self, rows: int) -> bool:
        """Whether a call of `rows` tokens runs its experts as grouped GEMMs (every expert
        staged, all resident and stacked, or 4-bit ones resident and held) rather than expert
        by expert."""
        from flexrun.kernels.dequant import fused_applies
        from flexrun.kernels.grouped4 import GROUPS
        p = self.p
        # 4-bit experts: grouped 4-bit GEMMs over the resident ones and the copies held for
        # the block, when all are resident or the block touches nearly all (no disk ones)
        four_bit = p.compress_weight and fused_applies(p.quant_bits, p.quant_group, self.e) \
            and p.quant_group in GROUPS and plain_experts(self.spec) and (
                p.weights_gpu >= 100 or (
                self.cuda and p.weights_disk == 0 and p.expert_lanes != "cpu" and
                touches_nearly_all(self.spec, rows * p.num_gpu_batches)))
        return grouped_fits(self.spec, rows, self.e) and (
            self._stages_all(rows) or four_bit or
            (p.weights_gpu >= 100 and not p.compress_weight))

    def _stages_all(self, rows: int) -> bool:
        """Whether the engine stages every expert for GPU batches of `rows` tokens on the copy
        lane (engine/experts.py stack): plain experts (silu-gated, no biases, not 4-bit) off
        disk on a GPU, the block's batches expected to touch STAGE_ALL of them, each call
        within the grouped GEMM's workspace."""
        block_rows = rows * self.p.num_gpu_batches
        return (self.cuda and not self.p.compress_weight and self.p.weights_disk == 0
                and plain_experts(self.spec) and touches_nearly_all(self.spec, block_rows)
                and grouped_fits(self.spec, rows, self.e))

    def _weight_math(self, kind: int, rows: int) -> tuple[Lin, int]:
        """(time of the compressed weights' math for the block, parameters left for the
        plain GEMM model). Compressed weights are either multiplied as 4-bit codes by the
        fused kernel (decode-sized row counts on CUDA) or decompressed to the compute dtype
        for every batch and then multiplied like dense ones."""
        from flexrun.kernels.dequant import FUSED_MAX_ROWS, fused_applies
        k, q = self.p.num_gpu_batches, self.unit_qparams[kind]
        if q and self.w4 and rows <= FUSED_MAX_ROWS \
                and fused_applies(self.p.quant_bits, self.p.quant_group, self.e):
            bw, flops = self.w4
            return (lin_expr(k * (self.unit_qbytes[kind] / bw + 2 * q * rows / flops)),
                    self.unit_params[kind] - q)
        return (lin_expr(k * q * (self.e + self.p.quant_bits / 8) / self.mem_bw),
                self.unit_params[kind])

    def _floor(self, comp: Lin, prefill: bool, kind: int = 0) -> Lin:
        """Add the per-call dispatch floor of the k batches: on a GPU kernels launch ahead
        asynchronously, so the device work only shows when it exceeds the launch time. Units
        whose decode step replays from a CUDA graph pay the replay floor instead; eager
        decoder layers (kind 1 and 3) their measured layer call."""
        share = self._graphed_share(prefill)
        eager = self.layer_call[kind == 1 and self.moe is not None] if kind in (1, 3) \
            else self.overhead
        per_call = share * (self.prof.gpu_graph_unit_overhead or 0.0) + (1 - share) * eager
        floor = self.p.num_gpu_batches * per_call
        comp["1"] = max(comp["1"], floor) if self.cuda else comp["1"] + floor
        return comp

    def _graphed_share(self, prefill: bool) -> float:
        """The share of units whose decode step replays from a CUDA graph (engine/graphs.py
        graphs a unit whose weights are all on the GPU and whose KV cache is dense there):
        all of them when every weight is resident; with whole units streamed
        (footprint.streams_whole_units), about the resident share; else (every unit holds a
        share of each tier) none."""
        p = self.p
        units = self.wl.units if self.wl.units is not None else range(self.spec.num_units)
        if (prefill or not self.cuda or not p.cuda_graphs or p.cache_gpu < 100
                or p.compress_cache or self.prof.gpu_graph_unit_overhead is None):
            return 0.0
        if p.weights_gpu >= 100:
            return 1.0
        if self.moe is not None:    # every MoE layer keeps some experts off the device
            return 0.0
        if streams_whole_units(p, self.cuda, units, self.spec.num_units):
            return p.weights_gpu / 100
        return 0.0

    def phases(self) -> list[tuple[str, float, list[tuple[int, dict]]]]:
        """(phase, repeat count, [(units of this kind, terms)]) for prefill and decode."""
        counts, n = self.wl.unit_counts(self.spec), self.wl.gen_len
        out = []
        for name, prefill, reps in (("prefill", True, 1.0), ("decode", False, max(n - 1, 0))):
            out.append((name, reps, [(cnt, self.unit_terms(kind, prefill))
                                     for kind, cnt in enumerate(counts) if cnt or kind < 3]))
        return out
