"""Placement LP for one block shape (pulp, HiGHS or CBC) and the search over block shapes.

The LP's variables are the placement fractions of costmodel (weights/cache/activations on
gpu/cpu/disk); constraints are footprint()'s memory rows; the objective is costmodel's time
per generated token. docs/costmodel.md describes both.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import functools
import math
import os
import sys
import time
from typing import Iterator

import torch

from flexrun.config import FlexrunError, Policy, format_size, parse_size
from flexrun.plan.cost_types import Prediction, SearchResult, Workload, add_exprs, lin_expr
from flexrun.plan.costmodel import RESOURCES, STREAMS, VARS, _DTYPES, _disk_cached, predict
from flexrun.plan.footprint import check_budget, footprint
from flexrun.plan.hardware import HardwareProfile
from flexrun.plan.unit_terms import UnitTerms
from flexrun.models.spec import ModelSpec


# ---- the LP for one block shape, and the search over shapes -------------------------------
@functools.lru_cache(maxsize=1)
def _solver():
    """HiGHS through highspy, else HiGHS's binary, else CBC (whichever this pulp can run)."""
    import pulp
    for name in ("HiGHS", "HiGHS_CMD", "PULP_CBC_CMD"):
        cls = getattr(pulp, name, None)
        if cls is not None and cls(msg=False).available():
            if name == "HiGHS":
                _highs_banner_once()
            return cls(msg=False)
    raise FlexrunError("no LP solver found: install highspy (pip install highspy)")


def _highs_banner_once() -> None:
    """HiGHS prints its banner ("Running HiGHS ... see THIRD_PARTY_NOTICES.md") from C++ to
    stdout when a process builds its first highspy.Highs(), before pulp can set output_flag
    (msg=False); later ones print nothing. Build that first one here with fd 1 on /dev/null."""
    import highspy
    with _stdout_fd_silenced():
        highspy.Highs()


@contextlib.contextmanager
def _stdout_fd_silenced():
    """fd 1 points at /dev/null inside (C/C++ writes included); Python's and C's buffers are
    flushed on the way in and out, so nothing written before or after is lost."""
    for f in (sys.stdout, sys.__stdout__):
        with contextlib.suppress(Exception):
            f.flush()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)
    try:
        saved = os.dup(1)
    except OSError:                 # no fd 1: nothing to keep quiet
        yield
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 1)
        finally:
            os.close(null)
        yield
    finally:
        with contextlib.suppress(Exception):
            ctypes.CDLL(None).fflush(None)  # C stdio's buffer goes to /dev/null, not to the output
        os.dup2(saved, 1)
        os.close(saved)


def _fast_spec(spec: ModelSpec) -> ModelSpec:
    """A copy whose unit_shapes()/all_shapes() are computed once (footprint calls them often)."""
    fast = copy.copy(spec)
    units = [spec.unit_shapes(u) for u in range(spec.num_units)]
    every = spec.all_shapes()
    fast.unit_shapes, fast.all_shapes = (lambda u: units[u]), (lambda: every)
    return fast


def _with(pol: Policy, **changes) -> Policy:
    return Policy.from_dict({**pol.to_dict(), **changes})


class _Search:
    """LPs for one (model, profile, workload, budgets); footprints are memoised."""

    fallback = False             # also try least-use placements when the LP finds none
    rounding_failed = False

    def __init__(self, spec, prof, wl: Workload, cuda: bool, elem: int, caps: dict):
        self.spec, self.prof, self.wl = _fast_spec(spec), prof, wl
        self.cuda, self.elem, self.caps = cuda, elem, caps
        # what the process holds before the run allocates: counted against the budgets
        self.base = {"gpu": (prof.gpu_context or 0) if cuda else 0,
                     "cpu": prof.cpu_baseline or 0, "disk": 0}
        self.memo: dict = {}
        self.lp_n, self.lp_max = 0, 0.0

    def fp(self, pol: Policy, lengths: bool = True):
        key = (tuple(pol.to_dict().values()), lengths)
        if key not in self.memo:
            P, G = (self.wl.prompt_len, self.wl.gen_len) if lengths else (None, None)
            self.memo[key] = footprint(self.spec, pol, self.elem, P, G, self.wl.units, self.cuda)
        return self.memo[key]

    def use(self, pol: Policy) -> dict[str, float]:
        """Peak bytes per budget ("gpu" / "cpu" / "disk"); CPU runs put both tiers in RAM."""
        fp = self.fp(pol)
        use = {t: fp.total(t) + self.base[t] for t in ("gpu", "cpu", "disk")}
        return use if self.cuda else {"gpu": 0, "cpu": use["gpu"] + use["cpu"],
                                      "disk": use["disk"]}

    def over(self, pol: Policy, caps: dict) -> dict[str, float]:
        return {t: u - caps[t] for t, u in self.use(pol).items() if u > caps[t]}

    def memory(self, shape: Policy) -> tuple[dict, float]:
        """Per-budget memory as linear expressions of the fractions, from footprint() at the
        candidate block: weights and cache are linear in their %, buffers are constants
        (streamed weights: 2 device buffers + 1 host staging buffer of the largest unit)."""
        fp0 = self.fp(_with(shape, weights_gpu=100, weights_cpu=0, weights_disk=0))
        unit = self.fp(_with(shape, weights_gpu=0, weights_cpu=100, weights_disk=0,
                             cache_gpu=100, cache_cpu=0, cpu_attention=False), False).host
        W, C = fp0.weights["gpu"], sum(fp0.cache.values())
        fixed, C = C * shape.gpu_cache_share, C * (1 - shape.gpu_cache_share)
        gpu = lin_expr(fp0.buffers + 2 * unit + fixed + self.base["gpu"], wg=W - 2 * unit, cg=C)
        cpu = lin_expr(fp0.host + unit + self.base["cpu"], wg=-unit, wc=W, cc=C)
        if not self.cuda:
            gpu, cpu = lin_expr(), add_exprs(gpu, cpu)
        mem = {"gpu": gpu, "cpu": cpu, "disk": lin_expr(wd=W, cd=C)}
        if self.cuda and fp0.load:          # the load's peak: weights placed + its transient
            mem["gpu_load"] = lin_expr(fp0.load + self.base["gpu"], wg=W)
        return mem, W + C + fixed + fp0.buffers + fp0.host

    def solve(self, shape: Policy, caps: dict, minimize: str | None = None):
        """Optimal fractions (dict) of the LP, or None when infeasible."""
        import pulp
        t0 = time.perf_counter()
        mem, everything = self.memory(shape)
        ctx = UnitTerms(self.spec, shape, self.prof, self.wl, self.cuda, self.elem,
                   _disk_cached(self.prof, everything, 0))
        lp = pulp.LpProblem("placement", pulp.LpMinimize)
        new_var = getattr(lp, "add_variable", None) or (lambda *a: pulp.LpVariable(*a))
        x = {v: new_var(v, 0, 1) for v in VARS}
        expr = lambda e: pulp.lpSum(c * (1 if k == "1" else x[k]) for k, c in e.items())  # noqa
        for trip in (VARS[0:3], VARS[3:6], VARS[6:9]):
            lp += pulp.lpSum(x[v] for v in trip) == 1
        for v in ("wc", "cc", "ac") if not self.cuda else ():
            lp += x[v] == 0        # host memory is the compute tier: "cpu" only adds buffers
        if shape.cache_gpu >= 100:
            lp += x["cg"] == 1
        for key, e in mem.items():
            tier = key.removesuffix("_load")
            if tier != minimize and len(e) > 1 and math.isfinite(caps[tier]):
                lp += expr(e) <= caps[tier]
        objective = []
        for name, reps, groups in ctx.phases():
            for i, (cnt, terms) in enumerate(groups):     # epigraph variable per unit kind
                t = new_var(f"t_{name}_{i}", 0)
                for group in STREAMS if shape.overlap and self.cuda else (RESOURCES,):
                    lp += t >= pulp.lpSum(expr(terms[r]) for r in group if r in terms)
                objective.append(reps * cnt * t)
        # ties (a stream that is not the bottleneck can take more slow-tier data for free)
        # go to the faster tier: whole-tensor rounding then hands the remainder to the
        # slowest tier in use, which would make such a free share a real cost
        tie = 1e-3 * pulp.lpSum(x[v] for v in ("wd", "cd", "ad")) + \
            1e-4 * pulp.lpSum(x[v] for v in ("wc", "cc", "ac"))
        lp += expr(mem[minimize]) if minimize else pulp.lpSum(objective) + tie
        lp.solve(_solver())
        self.lp_n, self.lp_max = self.lp_n + 1, max(self.lp_max, time.perf_counter() - t0)
        if pulp.LpStatus[lp.status] != "Optimal":
            return None
        return {v: min(1.0, max(0.0, x[v].value() or 0.0)) for v in VARS}

    def place(self, shape: Policy, minimize: str | None = None) -> Policy | None:
        """LP, integer rounding, then footprint() verification; when rounding overshoots a
        budget the LP is re-solved with that budget tightened by the overshoot."""
        caps = dict(self.caps)
        if minimize:
            caps[minimize] = math.inf
        adj = dict(caps)
        self.rounding_failed = False
        for attempt in range(8):
            x = self.solve(shape, adj, minimize)
            if x is None:
                return None
            pol = _round(shape, x)
            over = self.over(pol, caps)
            if not over:
                return pol
            for tier, extra in over.items():
                adj[tier] -= extra + 0.002 * caps[tier] * (1 + attempt)
        self.rounding_failed = True
        return None

    def _place_or_least(self, shape: Policy) -> Policy | None:
        """The LP's placement; when rounding to whole tensors keeps breaking a budget, the
        placement that uses least of a bounded tier, if it fits every budget."""
        pol = self.place(shape)
        retry = pol is None and (self.rounding_failed or self.fallback)
        for tier in ("gpu", "cpu", "disk") if retry else ():
            if not math.isinf(self.caps[tier]):
                least = self.place(shape, tier)
                if least is not None and not self.over(least, self.caps):
                    return least
        return pol

    def candidates(self, shape: Policy, device_cache: bool = False
                   ) -> list[tuple[float, Policy, Prediction]]:
        """The all-resident policy when it fits (nothing is faster for this block), else the
        LP's policy for each cache case: all on device, or off it with/without CPU attention;
        device_cache: instead, CPU attention with the cache of some GPU batches on the device
        (gpu_cache_batches, device_batches)."""
        resident = _with(shape, cache_gpu=100, cache_cpu=0, cpu_attention=False)
        if device_cache:
            cases = [(0, True, g) for g in self.device_batches(shape)]
        elif not self.over(resident, self.caps):
            cases = None
        else:
            cases = [(100, False, 0), (0, False, 0)] + ([(0, True, 0)] if self.cuda else [])
        pols = [resident] if cases is None else [
            self._place_or_least(_with(shape, cache_gpu=cg, cache_cpu=100 - cg,
                                       cpu_attention=a, gpu_cache_batches=g))
            for cg, a, g in cases]
        out = []
        for pol in filter(None, pols):
            pred = predict(self.spec, pol, self.prof, self.wl.prompt_len, self.wl.gen_len,
                           self.wl.num_prompts, "cuda" if self.cuda else "cpu", self.elem,
                           fp=self.fp(pol), units=self.wl.units)
            pred.peak = {t: v + self.base[t] for t, v in pred.peak.items()}
            out.append((pred.throughput, pol, pred))
        return out

    def device_batches(self, shape: Policy) -> list[int]:
        """Counts of GPU batches that may keep their KV cache on the device beside a host
        cache attended on the CPU (Policy.gpu_cache_batches): the most whose cache fits the
        GPU budget alone, a half and a quarter of that (the LP then fills the rest of the
        GPU with weights), always fewer than the block's batches."""
        k = shape.num_gpu_batches
        if not self.cuda:
            return []
        per_batch = sum(self.fp(_with(shape, cache_gpu=0, cache_cpu=100)).cache.values()) / k
        if k < 2 or not per_batch or not math.isfinite(self.caps["gpu"]):
            return []
        most = min(k - 1, int(self.caps["gpu"] // per_batch))
        return sorted({g for g in (most, (most + 1) // 2, (most + 3) // 4) if g > 0},
                      reverse=True)

    def _verified(self, shape: Policy, tier: str, need: float) -> float | None:
        """The LP's minimum for `tier`, raised until the rounded, tensor-granular placement
        really fits (one big tensor, such as an embedding, cannot be split)."""
        saved = self.caps[tier]
        try:
            for factor in (1.0, 1.05, 1.15, 1.3, 1.6, 2.0, 3.0):
                self.caps[tier] = need * factor
                if self.candidates(shape):
                    return need * factor
        finally:
            self.caps[tier] = saved
        return None

    def minimum_message(self, shape: Policy) -> str:
        """Name, per budget, the smallest value that would work with the smallest block
        (1 prompt) while the other budgets stay as given."""
        names = {"gpu": ("GPU memory", "--gpu-mem"), "cpu": ("CPU memory", "--cpu-mem"),
                 "disk": ("disk", "--disk-mem")}
        what = f"{self.spec.name or self.spec.arch} with prompts of {self.wl.prompt_len} + " \
               f"{self.wl.gen_len} tokens"
        fixes = []
        for tier in ("gpu", "cpu", "disk") if self.cuda else ("cpu", "disk"):
            if math.isinf(self.caps[tier]):
                continue            # an unbounded budget is not what is missing
            pols = [self.place(_with(shape, cache_gpu=cg, cache_cpu=100 - cg), tier)
                    for cg in (100, 0)]
            needs = [self.use(p)[tier] for p in pols if p is not None]
            need = self._verified(shape, tier, min(needs)) if needs else None
            if need is not None:
                label, flag = names[tier]
                fixes.append(f"at least {format_size(need)} of {label} ({flag} is "
                             f"{format_size(self.caps[tier])})")
        if not fixes:
            return f"no policy fits the budgets for {what}: raise --gpu-mem/--cpu-mem/--disk-mem"
        return (f"no policy fits the budgets for {what}: with the smallest block (1 prompt) it "
                f"needs {', or '.join(fixes)}, the other budgets as given")


def _round(shape: Policy, x: dict) -> Policy:
    """Integer percentages: floor each share, the remainder to the lowest tier in use."""
    d = {}
    for names in (("weights_gpu", "weights_cpu", "weights_disk"),
                  ("cache_gpu", "cache_cpu", "cache_disk"), ("act_gpu", "act_cpu", "act_disk")):
        vals = [x[v] for v in VARS if v[0] == names[0][0]]
        pct = [math.floor(100 * v + 1e-6) for v in vals]
        low = max(i for i, v in enumerate(vals) if v > 1e-6 or i == 0)
        pct[low] += 100 - sum(pct)
        d.update(zip(names, pct))
    return _with(shape, **d)


def _caps(prof: HardwareProfile, cuda: bool, gpu_mem, cpu_mem, disk_mem) -> dict:
    """Budgets in bytes; a missing one defaults to 90% (GPU) / 80% (CPU) of the profile's.

    A GPU budget above 90% of the device's memory is cut to that: the allocator's
    fragmentation needs the rest (an 80 GiB budget on an 80 GB H100 ran out); the CUDA
    context is counted on top (_Search.base)."""
    gpu, cpu, disk = parse_size(gpu_mem), parse_size(cpu_mem), parse_size(disk_mem)
    if prof.gpu_mem:
        gpu = 0.9 * prof.gpu_mem if gpu is None else min(gpu, 0.9 * prof.gpu_mem)
    elif gpu is None:
        gpu = math.inf
    cpu = 0.8 * prof.cpu_mem if cpu is None else cpu
    if disk is None:
        disk = prof.disk_mem if prof.disk_mem is not None else math.inf
    return {"gpu": gpu if cuda else math.inf, "cpu": cpu, "disk": disk}


def search(spec: ModelSpec, profile: HardwareProfile, prompt_len: int, gen_len: int,
           gpu_mem=None, cpu_mem=None, disk_mem=None, device: str = "cuda",
           dtype_bytes: int | None = None, num_prompts: int | None = None,
           compress_weight: bool = False, compress_cache: bool = False,
           cpu_held: int = 0) -> SearchResult:
    """The policy of highest predicted throughput within the budgets: an LP over placement
    for each (gpu_batch_size, num_gpu_batches, cache case). cpu_held: host bytes
    the process holds beyond the profile's baseline (an opened checkpoint's tokenizer)."""
    t0 = time.perf_counter()
    if cpu_held:
        profile = dataclasses.replace(profile,
                                      cpu_baseline=(profile.cpu_baseline or 0) + cpu_held)
    cuda = torch.device(device).type == "cuda"
    elem = dtype_bytes or (2 if cuda else 4)
    caps = _caps(profile, cuda, gpu_mem, cpu_mem, disk_mem)
    if cuda and profile.gpu_context is None and torch.cuda.is_available():
        # a profile that predates gpu_context: this process's CUDA context, measured now
        from flexrun.engine.budget import cuda_context_bytes
        ctx = min(cuda_context_bytes(torch.device(device)), 2 << 30)   # not other processes'
        profile = dataclasses.replace(profile, gpu_context=ctx)
    s = _Search(spec, profile, Workload(prompt_len, gen_len, num_prompts), cuda, elem, caps)
    best, shapes = _scan(s, num_prompts, cuda, compress_weight, compress_cache)
    if best is None:    # second pass: also try each tier's least-use placement (slower)
        s.fallback = True
        best, more = _scan(s, num_prompts, cuda, compress_weight, compress_cache)
        shapes += more
    if best is None:
        smallest = Policy(gpu_batch_size=1, compress_weight=compress_weight,
                          compress_cache=compress_cache)
        raise FlexrunError(s.minimum_message(smallest))
    lim = {t: None if math.isinf(v) else int(v) for t, v in caps.items()}
    check_budget(spec, best[1], torch.device(device), _DTYPES[elem], lim["gpu"], lim["cpu"],
                 lim["disk"], prompt_len, gen_len)
    return SearchResult(best[1], best[2], s.lp_n, s.lp_max, time.perf_counter() - t0, shapes)


def shape_grid(num_prompts: int | None, cuda: bool, compress_weight: bool,
               compress_cache: bool) -> Iterator[Iterator[list[Policy]]]:
    """The block shapes a search visits: per gpu_batch_size (ascending), the shapes by
    num_gpu_batches (ascending) with at most num_prompts prompts in a block, all with the
    compression asked for (the run applies the flags to whatever is planned, so the plan is
    made with them). A caller stops a row once a larger block cannot help, and the scan once
    a row fits nothing."""
    max_block = num_prompts or (4096 if cuda else 256)
    sizes = sorted({2 ** i for i in range(11)} | {3 * 2 ** i for i in range(2, 9)}
                   | ({num_prompts} if num_prompts else set()))   # the whole job in one batch
    batches = [b for b in sizes if b <= min(max_block, 1024 if cuda else 256)]
    yield ([Policy(gpu_batch_size=b, num_gpu_batches=k, compress_weight=compress_weight,
                   compress_cache=compress_cache) for k in (2 ** i for i in range(8))
            if b * k <= max_block] for b in batches)


REFINED = 4     # block shapes whose CPU-attention plan is retried with gpu_cache_batches


def _scan(s, num_prompts: int | None, cuda: bool, compress_weight: bool,
          compress_cache: bool):
    """The best (throughput, policy, prediction) over block shapes;
    then the REFINED best shapes planned with CPU attention are retried with the cache of
    some of their GPU batches on the device."""
    best, shapes, host_attn = None, 0, []
    for rows in shape_grid(num_prompts, cuda, compress_weight, compress_cache):
        for row in rows:
            fits_b = False
            for shape in row:
                found = s.candidates(shape)
                shapes, fits_b = shapes + 1, fits_b or bool(found)
                host_attn += [f for f in found if f[1].cpu_attention]
                for f in found:
                    if best is None or f[0] > best[0] * (1 + 1e-9):
                        best = f
                if not found or any(f[1].weights_gpu == 100 == f[1].cache_gpu for f in found):
                    break   # larger blocks: more memory, and no gain once all resident
            if not fits_b:
                break       # a larger batch needs more memory still
    host_attn.sort(key=lambda f: -f[0])
    for _, pol, _ in host_attn[:REFINED]:
        shape = _with(pol, cache_gpu=100, cache_cpu=0, cache_disk=0, cpu_attention=False)
        for f in s.candidates(shape, device_cache=True):
            if f[0] > best[0] * (1 + 1e-9):
                best = f
    return best, shapes
