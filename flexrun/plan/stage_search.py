"""Policies for pipeline stages: one block shape for all, a placement per stage (cost model).

Every stage sees every micro-batch of the block, so the block shape (gpu_batch_size x
num_gpu_batches) is shared; the placement (weights / KV cache / activations per tier, CPU
attention) is each stage's own, chosen by the placement LP over the stage's units with
--gpu-mem (its own GPU) and an even share of --cpu-mem and --disk-mem (one host).

A stage runs the block's M micro-batches in G = min(M, K) groups and loads its weights once per
group (engine/distributed.py), so its step time is G x that of a block of ceil(M/G) batches.
The pipeline's decode step takes max(slowest stage, sum of the stages / G): the bottleneck
stage, or one group's round trip through every stage when there are fewer groups than stages;
the prefill is one pass, sum / G + (G-1)/G x slowest.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from flexrun.config import FlexrunError, Policy
from flexrun.plan.cost_types import Prediction, Workload
from flexrun.plan.costmodel import predict
from flexrun.plan.stages import split_groups
from flexrun.plan.hardware import HardwareProfile
from flexrun.models.spec import ModelSpec
from flexrun.plan.search import _caps, _Search, _with, shape_grid


@dataclass
class StagePlan:
    """A policy per stage and the predicted times of the whole pipeline for one block."""
    units: list[range]
    policies: list[Policy]
    stage_prefill_s: list[float]    # each stage's time for the block's prefill (all groups)
    stage_decode_s: list[float]     # ... and for one decode step
    prefill_s: float
    decode_s: float
    block_s: float
    throughput: float               # generated tokens / s over the run
    peaks: list[dict]               # each stage's peak bytes per tier
    search_s: float = 0.0

    def to_dict(self) -> dict:
        return {"stages": [{"units": [u.start, u.stop], "policy": p.to_dict(),
                            "prefill_s": a, "decode_s": b, "peak_bytes": pk}
                           for u, p, a, b, pk in zip(self.units, self.policies,
                                                     self.stage_prefill_s,
                                                     self.stage_decode_s, self.peaks)],
                "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "block_s": self.block_s, "throughput_tok_s": self.throughput}


def pipeline_times(prefill: list[float], decode: list[float], groups: int
                   ) -> tuple[float, float]:
    """(prefill, decode step) of K stages whose per-step times (all G groups) are given."""
    pre = sum(prefill) / groups + (groups - 1) / groups * max(prefill)
    return pre, max(max(decode), sum(decode) / groups)


def stage_times(search: _Search, pol: Policy, groups: int) -> tuple[float, float, Prediction]:
    """A stage's (prefill, decode step) for the whole block run in `groups` groups."""
    k = -(-pol.num_gpu_batches // groups)
    sub = _with(pol, num_gpu_batches=k, gpu_cache_batches=min(pol.gpu_cache_batches, k))
    pred = predict(search.spec, sub, search.prof, search.wl.prompt_len, search.wl.gen_len,
                   None, "cuda" if search.cuda else "cpu", search.elem, fp=search.fp(pol),
                   units=search.wl.units)
    return groups * pred.prefill_s, groups * pred.decode_s, pred


def plan_for_shape(searches: list[_Search], shape: Policy, units: list[range],
                   num_prompts: int | None) -> StagePlan | None:
    """Each stage's fastest candidate placement at this block shape (None: a stage has none)."""
    groups = len(split_groups(shape.num_gpu_batches, len(searches)))
    gen = searches[0].wl.gen_len
    pols, pre, dec, peaks = [], [], [], []
    for s in searches:
        timed = []
        for _, pol, _ in s.candidates(shape):
            a, b, _ = stage_times(s, pol, groups)
            timed.append((a + max(gen - 1, 0) * b, a, b, pol))
        if not timed:
            return None
        _, a, b, pol = min(timed, key=lambda t: t[0])
        pols.append(pol)
        pre.append(a)
        dec.append(b)
        peaks.append(s.use(pol))
    p, d = pipeline_times(pre, dec, groups)
    block_s = p + max(gen - 1, 0) * d
    prompts = num_prompts or shape.block_size
    blocks = math.ceil(prompts / shape.block_size)
    return StagePlan(units, pols, pre, dec, p, d, block_s, prompts * gen / (blocks * block_s),
                     peaks)


def search_stages(spec: ModelSpec, profile: HardwareProfile, units: list[range],
                  prompt_len: int, gen_len: int, gpu_mem=None, cpu_mem=None, disk_mem=None,
                  device: str = "cuda", dtype_bytes: int | None = None,
                  num_prompts: int | None = None, compress_weight: bool = False,
                  compress_cache: bool = False) -> StagePlan:
    """The plan of highest predicted pipeline throughput: for each block shape, each stage's
    best placement within its budgets (the one-GPU search's shapes, cut-offs and fallback)."""
    t0 = time.perf_counter()
    cuda = torch.device(device).type == "cuda"
    elem = dtype_bytes or (2 if cuda else 4)
    K = len(units)
    caps = _caps(profile, cuda, gpu_mem, cpu_mem, disk_mem)
    share = {t: v if t == "gpu" else v / K for t, v in caps.items()}
    searches = [_Search(spec, profile, Workload(prompt_len, gen_len, num_prompts, u), cuda,
                        elem, share) for u in units]
    best = _scan(searches, units, num_prompts, cuda, compress_weight, compress_cache)
    if best is None:    # second pass: also each tier's least-use placement (slower)
        for s in searches:
            s.fallback = True
        best = _scan(searches, units, num_prompts, cuda, compress_weight, compress_cache)
    if best is None:
        smallest = Policy(gpu_batch_size=1, compress_weight=compress_weight,
                          compress_cache=compress_cache)
        for i, s in enumerate(searches):
            if not s.candidates(smallest):
                raise FlexrunError(f"pipeline stage {i} of {K} (each gets 1/{K} of --cpu-mem "
                                   f"and --disk-mem): {s.minimum_message(smallest)}")
        raise FlexrunError("no block shape fits every pipeline stage: raise the budgets")
    best.search_s = time.perf_counter() - t0
    return best


def _scan(searches: list[_Search], units: list[range], num_prompts: int | None, cuda: bool,
          compress_weight: bool, compress_cache: bool) -> StagePlan | None:
    """The best plan over block shapes (None: nothing fits)."""
    best: StagePlan | None = None
    for rows in shape_grid(num_prompts, cuda, compress_weight, compress_cache):
        for row in rows:
            fits_b = False
            for shape in row:
                plan = plan_for_shape(searches, shape, units, num_prompts)
                fits_b = fits_b or plan is not None
                if plan is not None and (best is None or
                                         plan.throughput > best.throughput * (1 + 1e-9)):
                    best = plan
                resident = plan is not None and all(
                    p.weights_gpu == 100 == p.cache_gpu for p in plan.policies)
                if plan is None or (resident and shape.num_gpu_batches >= len(units)):
                    break   # larger blocks: more memory; no gain once resident and full
            if not fits_b:
                break
    return best


def format_plan(plan: StagePlan, describe) -> str:
    """The plan in a few lines; describe(units) names a stage's units."""
    fmt = lambda t: "/".join(f"{x:g}" for x in t)  # noqa: E731
    p0 = plan.policies[0]
    lines = [f"pipeline of {len(plan.units)} stages, block {p0.gpu_batch_size} x "
             f"{p0.num_gpu_batches}"]
    for i, (u, p, a, b) in enumerate(zip(plan.units, plan.policies, plan.stage_prefill_s,
                                         plan.stage_decode_s)):
        lines.append(f"stage {i} ({describe(u)}): weights {fmt(p.weights_split())}, cache "
                     f"{fmt(p.cache_split())}, act {fmt(p.act_split())} (% gpu/cpu/disk), "
                     f"cpu_attention {p.cpu_attention}; prefill {a:.3f}s, decode {b:.4f}s/step")
    lines.append(f"predicted: prefill {plan.prefill_s:.3f}s, decode {plan.decode_s:.4f}s/step, "
                 f"total {plan.throughput:.2f} tok/s")
    return "\n".join(lines)
