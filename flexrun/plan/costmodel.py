"""FlexGen-style cost model: the prediction for one policy.

Time of one unit (embedding, decoder layer, head) for one block is a sum of *terms* that are
linear in the placement fractions (wg..ad: weights/cache/activations on gpu/cpu/disk);
unit_terms.py builds them. Terms on different STREAMS overlap (time = max over streams) when
policy.overlap is set. docs/costmodel.md has the formulas; search.py holds the LP and the
search.
"""
from __future__ import annotations

import math

import torch

from flexrun.config import Policy
from flexrun.models.spec import ModelSpec
from flexrun.plan.cost_types import Lin, Prediction, Workload, lin_value
from flexrun.plan.footprint import footprint
from flexrun.plan.hardware import HardwareProfile
from flexrun.plan.unit_terms import UnitTerms

VARS = ("wg", "wc", "wd", "cg", "cc", "cd", "ag", "ac", "ad")
# terms that run concurrently (pipeline.py: weights load on the io thread / weight stream,
# KV and activation stores on the store stream; KV and activation loads are synchronous
# with compute). A CPU run has one stream: its reads are copies and page faults on the
# cores the compute uses.
# "host_mem" is no stream of its own but a bound: CPU attention and the weight DMA both read
# host DRAM, so while weights stream in, CPU attention runs slower (profile:
# cpu_attn_bw_with_h2d); it bounds the unit time only when streams overlap.
# "link" is the host->GPU copy time of weights, cache and activations together: one link
# (PCIe) carries all three; disk reads are not on it.
STREAMS = (("compute", "cache_load", "act_load"), ("weights",), ("cache_store", "act_store"),
           ("host_mem",), ("link",))
RESOURCES = ("compute", "weights", "cache_load", "cache_store", "act_load", "act_store")
PAGE_CACHE_SHARE = 0.9     # disk data read back from the page cache when it fits in this share
_DTYPES = {2: torch.float16, 4: torch.float32}


# ---- evaluating a policy ------------------------------------------------------------------
def _fractions(policy: Policy) -> dict[str, float]:
    vals = policy.weights_split() + policy.cache_split() + policy.act_split()
    return {v: x / 100.0 for v, x in zip(VARS, vals)}


def _unit_time(terms: dict[str, Lin], x: dict, overlap: bool) -> float:
    vals = {r: lin_value(e, x) for r, e in terms.items()}
    if not overlap:
        return sum(vals.get(r, 0.0) for r in RESOURCES)
    return max(sum(vals.get(r, 0.0) for r in group) for group in STREAMS)


def _disk_cached(prof: HardwareProfile, disk: float, host: float) -> bool:
    """Data on the disk tier is read back from the page cache when it fits in spare RAM."""
    return (prof.disk_read_cached is not None and disk > 0
            and disk + host <= PAGE_CACHE_SHARE * prof.cpu_mem)


def reads_page_cache(prof: HardwareProfile, fp, cuda: bool) -> bool:
    """Whether a run with footprint `fp` reads its disk tier back from the page cache (host
    memory in use: the CPU tier, plus the compute tier on a CPU run)."""
    host = fp.total("cpu") + (0 if cuda else fp.total("gpu"))
    return _disk_cached(prof, fp.total("disk"), host)


def predict(spec: ModelSpec, policy: Policy, profile: HardwareProfile, prompt_len: int,
            gen_len: int, num_prompts: int | None = None, device: str | None = None,
            dtype_bytes: int | None = None, disk_cached: bool | None = None,
            fp=None, units: range | None = None) -> Prediction:
    """Predicted prefill / decode times and throughput of any `policy` (e.g. to print
    predicted vs measured next to a benchmark). device None: cuda when the profile has GPU
    rates; dtype_bytes None: 2 on cuda, 4 on cpu; disk_cached None: decided from memory;
    units: only these units (one pipeline stage)."""
    device = device or ("cuda" if profile.gpu_flops_prefill else "cpu")
    cuda = torch.device(device).type == "cuda"
    elem = dtype_bytes or (2 if cuda else 4)
    fp = fp or footprint(spec, policy, elem, prompt_len, gen_len, units, cuda)
    if disk_cached is None:
        disk_cached = reads_page_cache(profile, fp, cuda)
    ctx = UnitTerms(spec, policy, profile, Workload(prompt_len, gen_len, num_prompts, units), cuda,
               elem, disk_cached)
    x = _fractions(policy)
    times, breakdown = {}, {}
    for name, reps, groups in ctx.phases():
        times[name] = sum(cnt * _unit_time(t, x, policy.overlap and cuda) for cnt, t in groups)
        breakdown[name] = {r: sum(cnt * lin_value(t[r], x) for cnt, t in groups if r in t)
                           for r in RESOURCES}
    block_s = times["prefill"] + max(gen_len - 1, 0) * times["decode"]
    bls = policy.block_size
    prompts = num_prompts or bls
    blocks = math.ceil(prompts / bls)
    return Prediction(prefill_s=times["prefill"], decode_s=times["decode"], block_s=block_s,
                      blocks=blocks, throughput=prompts * gen_len / (blocks * block_s),
                      decode_throughput=bls / times["decode"] if times["decode"] else math.inf,
                      peak={t: fp.total(t) for t in ("gpu", "cpu", "disk")},
                      breakdown=breakdown, disk_cached=disk_cached)
