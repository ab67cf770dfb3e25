"""FlexGen-style cost model: per-unit time terms, an LP over placement, a search over blocks.

Time of one unit (embedding, decoder layer, head) for one block is a sum of *terms* that are
linear in the placement fractions (wg..ad: weights/cache/activations on gpu/cpu/disk).
Terms on different STREAMS overlap (time = max over streams) when policy.overlap is set.
docs/costmodel.md has the formulas.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .config import FlexrunError, Policy, format_size, parse_size
from .footprint import check_budget, footprint, is_compressible, numel, weight_bytes
from .hardware import HardwareProfile, default_profile
from .models.spec import ModelSpec

VARS = ("wg", "wc", "wd", "cg", "cc", "cd", "ag", "ac", "ad")
# terms that run concurrently with each other (pipeline.py: weights stream on the io thread /
# weight CUDA stream; cache and activation I/O are synchronous with compute)
STREAMS = (("compute", "cache", "act"), ("weights",))
RESOURCES = ("compute", "weights", "cache", "act")
PAGE_CACHE_SHARE = 0.9     # disk data read back from the page cache when it fits in this share
_DTYPES = {2: torch.float16, 4: torch.float32}
Lin = dict  # linear expression: variable -> coefficient, "1" -> constant


@dataclass
class Workload:
    prompt_len: int
    gen_len: int
    num_prompts: int | None = None


@dataclass
class Prediction:
    """Predicted times of one block (gpu_batch_size x num_gpu_batches prompts)."""
    prefill_s: float                 # the prefill step (first token)
    decode_s: float                  # one decode step, averaged over the generation
    block_s: float                   # prefill + (gen_len - 1) decode steps
    throughput: float                # generated tokens / s over the whole run
    decode_throughput: float         # tokens / s of the decode steps alone
    peak: dict                       # peak bytes per tier ("gpu", "cpu", "disk")
    breakdown: dict = field(default_factory=dict)   # phase -> resource -> s per block
    disk_cached: bool = False        # disk reads assumed served from the page cache

    def to_dict(self) -> dict:
        return {"prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "block_s": self.block_s, "throughput_tok_s": self.throughput,
                "decode_throughput_tok_s": self.decode_throughput, "peak_bytes": self.peak,
                "disk_cached": self.disk_cached}


@dataclass
class SearchResult:
    policy: Policy
    prediction: Prediction
    lp_solves: int = 0
    lp_max_s: float = 0.0
    search_s: float = 0.0
    candidates: int = 0


# ---- linear expressions -------------------------------------------------------------------
def _lin(const: float = 0.0, **coef: float) -> Lin:
    return {"1": const, **coef}


def _add(*exprs: Lin) -> Lin:
    out: Lin = {}
    for e in exprs:
        for k, v in e.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _value(e: Lin, x: dict) -> float:
    return sum(v * (1.0 if k == "1" else x[k]) for k, v in e.items())


# ---- the per-unit terms -------------------------------------------------------------------
class _Ctx:
    """Rates and sizes shared by the terms of one (spec, policy shape, profile, workload)."""

    def __init__(self, spec: ModelSpec, policy: Policy, prof: HardwareProfile, wl: Workload,
                 cuda: bool, elem: int, disk_cached: bool):
        self.spec, self.p, self.prof, self.wl, self.cuda, self.e = spec, policy, prof, wl, cuda, elem
        if cuda and None in (prof.h2d_pinned, prof.gpu_flops_prefill, prof.gpu_mem_bw):
            raise FlexrunError(f"hardware profile {prof.device_name!r} has no GPU measurements: "
                               "pass a profile made with `flexrun profile --device cuda`")
        pin = policy.pin_weights
        self.h2d_w = (prof.h2d_pinned if pin else prof.h2d_pageable) if cuda else math.inf
        self.h2d = prof.h2d_pinned if cuda else math.inf
        self.d2h = prof.d2h_pinned if cuda else math.inf
        self.h2d_pg = prof.h2d_pageable if cuda else math.inf
        self.d2h_pg = prof.d2h_pageable if cuda else math.inf
        self.disk_r = prof.disk_read_cached if disk_cached else prof.disk_read
        self.disk_w = prof.disk_write
        self.mem_bw = prof.gpu_mem_bw if cuda else prof.cpu_mem_bw
        self.attn_bw = (prof.gpu_attn_bw or prof.gpu_mem_bw) if cuda else prof.cpu_attn_bw
        self.flops_pre = prof.gpu_flops_prefill if cuda else prof.cpu_flops_prefill
        # per unit kind (embed, layer, head): stored bytes, GEMM parameters, compressed params
        self.unit_bytes, self.unit_params, self.unit_qparams = [], [], []
        for kind, u in enumerate((0, 1, spec.num_layers + 1)):
            shapes = spec.unit_shapes(u)
            self.unit_bytes.append(sum(weight_bytes(n, s, elem, policy) for n, s in shapes.items()))
            skip = ("embed.tokens", "embed.positions") if kind == 0 else ()
            self.unit_params.append(sum(numel(s) for n, s in shapes.items()
                                        if len(s) == 2 and n not in skip))
            self.unit_qparams.append(sum(numel(s) for n, s in shapes.items()
                                         if policy.compress_weight and is_compressible(n, s)))
        self.kv_elem = (policy.quant_bits / 8 + 4 / policy.quant_group) \
            if policy.compress_cache else elem          # stored bytes per cache value

    def gemm(self, rows: int, params: int) -> float:
        return 2.0 * rows * params / self.prof.gemm_rate(rows, self.cuda) if params else 0.0

    def load(self, nbytes: float, cpu: str, disk: str, pinned: bool = True) -> Lin:
        """Seconds to bring nbytes to the compute device from the cpu / disk tier."""
        h2d = self.h2d if pinned else self.h2d_pg
        return {cpu: nbytes / h2d, disk: nbytes / self.disk_r + nbytes / h2d}

    def store(self, nbytes: float, cpu: str, disk: str, pinned: bool = True) -> Lin:
        d2h = self.d2h if pinned else self.d2h_pg
        return {cpu: nbytes / d2h, disk: nbytes / self.disk_w + nbytes / d2h}

    def unit_terms(self, kind: int, prefill: bool) -> dict[str, Lin]:
        """Terms of one unit (0 embed, 1 layer, 2 head) for one step of the whole block."""
        s, p, e = self.spec, self.p, self.e
        b, k = p.gpu_batch_size, p.num_gpu_batches
        P, n = self.wl.prompt_len, self.wl.gen_len
        rows = b * P if prefill else b
        t_avg = P if prefill else P + n / 2.0          # keys seen by an average decode step
        wb = self.unit_bytes[kind]
        weights = {"wc": wb / self.h2d_w, "wd": wb / self.disk_r + wb / self.h2d_w}
        # compressed weights are decompressed for every batch on the compute device
        comp = k * self.unit_qparams[kind] * (e + p.quant_bits / 8) / self.mem_bw
        if kind == 0:
            comp += k * (self.gemm(rows, self.unit_params[0]) + 2 * rows * s.hidden_size * e
                         / self.mem_bw)
            return {"compute": _lin(comp), "weights": weights}
        if kind == 2:
            comp += k * (self.gemm(b, self.unit_params[2]) + 4 * b * s.vocab_size / self.mem_bw)
            return {"compute": _lin(comp), "weights": weights}
        h, hd = s.hidden_size, s.head_dim
        misc = rows * (12 * h + 3 * s.ffn_dim) * e / self.mem_bw     # norms, bias, relu, adds
        comp += k * (self.gemm(rows, self.unit_params[1]) + misc)
        kv_blk = 2 * b * k * t_avg * s.kv_dim * self.kv_elem          # the block's keys+values
        compute, cache = _lin(comp), _lin()
        if prefill:
            attn_flops = 4.0 * b * P * P * s.num_heads * hd
            compute["1"] += k * attn_flops / self.flops_pre
            cache = self.store(kv_blk, "cc", "cd") if self.cuda else {"cd": kv_blk / self.disk_w}
        else:
            new = 2 * b * k * s.kv_dim * self.kv_elem                 # this step's k, v
            if not self.cuda:        # the cache is in host memory already; disk is read back
                compute["1"] += kv_blk / self.attn_bw
                cache = {"cd": kv_blk / self.disk_r + new / self.disk_w}
            elif p.cpu_attention:    # ship q/k/v and the output; attention where the cache is
                qkv = b * k * (2 * s.num_heads * hd + 2 * s.kv_dim) * e
                compute = _add(compute, {"cg": kv_blk / self.attn_bw,
                                         "cc": kv_blk / self.prof.cpu_attn_bw + qkv / self.h2d,
                                         "cd": kv_blk / self.prof.cpu_attn_bw + qkv / self.h2d})
                cache = {"cd": kv_blk / self.disk_r + new / self.disk_w}
            else:                    # bring the prefix to the GPU, attend there
                compute["1"] += kv_blk / self.attn_bw
                cache = _add(self.load(kv_blk, "cc", "cd"), self.store(new, "cc", "cd"))
        act_b = b * k * (P if prefill else 1) * h * e
        act = _add(self.load(act_b, "ac", "ad", pinned=False),
                   self.store(act_b, "ac", "ad", pinned=False)) if self.cuda else \
            {"ad": act_b / self.disk_r + act_b / self.disk_w}
        return {"compute": compute, "weights": weights, "cache": _add(_lin(), cache),
                "act": _add(_lin(), act)}

    def phases(self) -> list[tuple[str, float, list[tuple[int, dict]]]]:
        """(phase, repeat count, [(units of this kind, terms)]) for prefill and decode."""
        L, n = self.spec.num_layers, self.wl.gen_len
        out = []
        for name, prefill, reps in (("prefill", True, 1.0), ("decode", False, max(n - 1, 0))):
            out.append((name, reps, [(cnt, self.unit_terms(kind, prefill))
                                     for kind, cnt in ((0, 1), (1, L), (2, 1))]))
        return out


# ---- evaluating a policy ------------------------------------------------------------------
def _fractions(policy: Policy) -> dict[str, float]:
    vals = policy.weights_split() + policy.cache_split() + policy.act_split()
    return {v: x / 100.0 for v, x in zip(VARS, vals)}


def _unit_time(terms: dict[str, Lin], x: dict, overlap: bool) -> float:
    vals = {r: _value(e, x) for r, e in terms.items()}
    if not overlap:
        return sum(vals.values())
    return max(sum(vals.get(r, 0.0) for r in group) for group in STREAMS)


def _host_bytes(fp, cuda: bool) -> int:
    return fp.total("cpu") + (0 if cuda else fp.total("gpu"))


def _disk_cached(prof: HardwareProfile, disk_bytes: float, host_bytes: float) -> bool:
    """Data on the disk tier is read back from the page cache when it fits in spare RAM."""
    return (prof.disk_read_cached is not None and disk_bytes > 0
            and disk_bytes + host_bytes <= PAGE_CACHE_SHARE * prof.cpu_mem)


def predict(spec: ModelSpec, policy: Policy, profile: HardwareProfile, prompt_len: int,
            gen_len: int, num_prompts: int | None = None, device: str = "cuda",
            dtype_bytes: int | None = None, disk_cached: bool | None = None) -> Prediction:
    """Predicted prefill / decode times and throughput of `policy` (any policy, e.g. for
    printing predicted vs measured next to a benchmark)."""
    cuda = torch.device(device).type == "cuda"
    elem = dtype_bytes or (2 if cuda else 4)
    fp = footprint(spec, policy, elem, prompt_len, gen_len)
    if disk_cached is None:
        disk_cached = _disk_cached(profile, fp.total("disk"), _host_bytes(fp, cuda))
    ctx = _Ctx(spec, policy, profile, Workload(prompt_len, gen_len, num_prompts), cuda, elem,
               disk_cached)
    x = _fractions(policy)
    times, breakdown = {}, {}
    for name, reps, groups in ctx.phases():
        times[name] = sum(cnt * _unit_time(t, x, policy.overlap) for cnt, t in groups)
        breakdown[name] = {r: sum(cnt * _value(t[r], x) for cnt, t in groups if r in t)
                           for r in RESOURCES}
    decode_steps = max(gen_len - 1, 0)
    block_s = times["prefill"] + decode_steps * times["decode"]
    bls = policy.block_size
    prompts = num_prompts or bls
    total_s = math.ceil(prompts / bls) * block_s
    return Prediction(prefill_s=times["prefill"], decode_s=times["decode"], block_s=block_s,
                      throughput=prompts * gen_len / total_s,
                      decode_throughput=bls / times["decode"] if times["decode"] else math.inf,
                      peak={t: fp.total(t) for t in ("gpu", "cpu", "disk")},
                      breakdown=breakdown, disk_cached=disk_cached)


# ---- the LP for one candidate block -------------------------------------------------------
def _solver():
    import pulp
    for make in (lambda: pulp.HiGHS(msg=False), lambda: pulp.HiGHS_CMD(msg=False),
                 lambda: pulp.PULP_CBC_CMD(msg=False)):
        try:
            s = make()
            if s.available():
                return s
        except Exception:   # noqa: BLE001 - a solver missing in this pulp build
            continue
    raise FlexrunError("no LP solver found: install highspy (pip install highspy)")


@dataclass
class _Caps:
    gpu: float
    cpu: float
    disk: float


def _memory_terms(spec, shape: Policy, elem, wl: Workload, cuda: bool):
    """Per-tier memory as linear expressions, from footprint() at probe placements."""
    probe = Policy.from_dict({**shape.to_dict(), "weights_gpu": 100, "weights_cpu": 0,
                              "weights_disk": 0})
    fp0 = footprint(spec, probe, elem, wl.prompt_len, wl.gen_len)
    stream = footprint(spec, Policy.from_dict({**probe.to_dict(), "weights_gpu": 0,
                                               "weights_cpu": 100}), elem, None, None).host
    W, C = fp0.weights["gpu"], sum(fp0.cache.values())
    # streamed weights need 2 device buffers + 1 host staging buffer of the largest unit
    gpu = _lin(fp0.buffers + 2 * stream, wg=W - 2 * stream, cg=C)
    cpu = _lin(fp0.host + stream, wg=-stream, wc=W, cc=C)
    if not cuda:         # one host memory holds both "tiers"
        gpu, cpu = _add(gpu, cpu), _lin()
    return {"gpu": gpu, "cpu": cpu, "disk": _lin(wd=W, cd=C)}, W + C + fp0.buffers + fp0.host


def _solve(spec, shape: Policy, prof, wl: Workload, cuda: bool, elem: int, caps: _Caps,
           minimize_tier: str | None = None):
    """Solve the placement LP; returns (fractions, objective) or None when infeasible."""
    import pulp
    mem, everything = _memory_terms(spec, shape, elem, wl, cuda)
    cached = _disk_cached(prof, everything, 0)
    ctx = _Ctx(spec, shape, prof, wl, cuda, elem, cached)
    lp = pulp.LpProblem("placement", pulp.LpMinimize)
    x = {v: pulp.LpVariable(v, 0, 1) for v in VARS}
    expr = lambda e: pulp.lpSum(c * (1 if k == "1" else x[k]) for k, c in e.items())  # noqa
    for trip in (VARS[0:3], VARS[3:6], VARS[6:9]):
        lp += pulp.lpSum(x[v] for v in trip) == 1
    if not cuda:         # host memory is the compute tier: "cpu" would only add buffers
        for v in ("wc", "cc", "ac"):
            lp += x[v] == 0
    if shape.cache_gpu >= 100:
        lp += x["cg"] == 1
    for tier in ("gpu", "cpu", "disk"):
        cap = getattr(caps, tier)
        if tier != minimize_tier and mem[tier] and math.isfinite(cap):
            lp += expr(mem[tier]) <= cap
    objective = []
    for name, reps, groups in ctx.phases():
        for i, (cnt, terms) in enumerate(groups):
            t = pulp.LpVariable(f"t_{name}_{i}", 0)
            if shape.overlap:
                for group in STREAMS:
                    lp += t >= pulp.lpSum(expr(terms[r]) for r in group if r in terms)
            else:
                lp += t >= pulp.lpSum(expr(e) for e in terms.values())
            objective.append(reps * cnt * t)
    lp += expr(mem[minimize_tier]) if minimize_tier else pulp.lpSum(objective)
    lp.solve(_solver())
    if pulp.LpStatus[lp.status] != "Optimal":
        return None
    return {v: min(1.0, max(0.0, x[v].value() or 0.0)) for v in VARS}, pulp.value(lp.objective)


def _round(shape: Policy, x: dict) -> Policy:
    """Integer percentages: floor each share, the remainder to the lowest tier in use."""
    d = shape.to_dict()
    for names in (("weights_gpu", "weights_cpu", "weights_disk"),
                  ("cache_gpu", "cache_cpu", "cache_disk"), ("act_gpu", "act_cpu", "act_disk")):
        vals = [x[v] for v in VARS if v[0] == names[0][0]]
        pct = [math.floor(100 * v + 1e-6) for v in vals]
        low = max(i for i, v in enumerate(vals) if v > 1e-6 or i == 0)
        pct[low] += 100 - sum(pct)
        d.update(zip(names, pct))
    return Policy.from_dict(d)


def _over(spec, pol: Policy, elem, wl: Workload, cuda: bool, caps: _Caps) -> dict[str, float]:
    """Bytes by which each tier of the rounded policy exceeds its cap (footprint's totals)."""
    fp = footprint(spec, pol, elem, wl.prompt_len, wl.gen_len)
    use = {"gpu": fp.total("gpu"), "cpu": fp.total("cpu"), "disk": fp.total("disk")}
    if not cuda:
        use = {"gpu": 0, "cpu": use["gpu"] + use["cpu"], "disk": use["disk"]}
    return {t: use[t] - getattr(caps, t) for t in use if use[t] > getattr(caps, t)}


def solve_candidate(spec, shape: Policy, prof, wl: Workload, cuda: bool, elem: int,
                    caps: _Caps, stats: dict | None = None) -> Policy | None:
    """LP + rounding + fix-up: a Policy of this block shape within the caps, or None."""
    adj = _Caps(caps.gpu, caps.cpu, caps.disk)
    for _ in range(8):
        t0 = time.perf_counter()
        res = _solve(spec, shape, prof, wl, cuda, elem, adj)
        if stats is not None:
            stats["n"] = stats.get("n", 0) + 1
            stats["max"] = max(stats.get("max", 0.0), time.perf_counter() - t0)
        if res is None:
            return None
        pol = _round(shape, res[0])
        over = _over(spec, pol, elem, wl, cuda, caps)
        if not over:
            return pol
        for tier, extra in over.items():    # tighten the LP by what rounding added, retry
            setattr(adj, tier, getattr(adj, tier) - extra - 0.002 * getattr(caps, tier))
    return None


# ---- the search ---------------------------------------------------------------------------
def _batch_sizes(limit: int) -> list[int]:
    sizes = {2 ** i for i in range(11)} | {3 * 2 ** i for i in range(2, 10)}
    return sorted(v for v in sizes if v <= limit) or [1]


def _caps(prof: HardwareProfile, cuda: bool, gpu_mem, cpu_mem, disk_mem) -> _Caps:
    """Budgets in bytes; a missing one defaults to 90% (GPU) / 80% (CPU) of the profile's."""
    gpu, cpu, disk = parse_size(gpu_mem), parse_size(cpu_mem), parse_size(disk_mem)
    if gpu is None:
        gpu = 0.9 * prof.gpu_mem if (cuda and prof.gpu_mem) else math.inf
    if cpu is None:
        cpu = 0.8 * prof.cpu_mem
    if disk is None:
        disk = prof.disk_mem if prof.disk_mem is not None else math.inf
    return _Caps(gpu if cuda else math.inf, cpu, disk)


def search(spec: ModelSpec, profile: HardwareProfile, prompt_len: int, gen_len: int,
           gpu_mem=None, cpu_mem=None, disk_mem=None, device: str = "cuda",
           dtype_bytes: int | None = None, num_prompts: int | None = None,
           compress_weight: bool = False, compress_cache: bool = False) -> SearchResult:
    """The fastest policy (throughput) within the budgets: LP per (batch, #batches, flags)."""
    t_start = time.perf_counter()
    cuda = torch.device(device).type == "cuda"
    elem = dtype_bytes or (2 if cuda else 4)
    caps = _caps(profile, cuda, gpu_mem, cpu_mem, disk_mem)
    wl = Workload(prompt_len, gen_len, num_prompts)
    max_block = num_prompts or (4096 if cuda else 256)
    stats: dict = {}
    best: tuple[float, Policy, Prediction] | None = None
    count = 0
    for cw in sorted({False, compress_weight}):
        for cc in sorted({False, compress_cache}):
            for b in _batch_sizes(min(max_block, 1024 if cuda else 256)):
                fits_b = False
                for k in (2 ** i for i in range(8)):
                    if b * k > max_block:
                        break
                    shape = Policy(gpu_batch_size=b, num_gpu_batches=k, compress_weight=cw,
                                   compress_cache=cc)
                    found = _candidates(spec, profile, wl, cuda, elem, caps, stats, shape)
                    count += 1
                    fits_b |= bool(found)
                    for f in found:
                        if best is None or f[0] > best[0] * (1 + 1e-9):
                            best = f
                    if not found or any(f[1].weights_gpu == 100 == f[1].cache_gpu
                                        for f in found):
                        break   # larger blocks: more memory, and no gain once all resident
                if not fits_b:
                    break       # a larger batch needs more memory still
    if best is None:
        raise FlexrunError(_infeasible_message(spec, profile, wl, cuda, elem, caps,
                                               compress_weight, compress_cache))
    check_budget(spec, best[1], torch.device(device), _DTYPES[elem], _b(caps.gpu),
                 _b(caps.cpu), _b(caps.disk), prompt_len, gen_len)
    return SearchResult(best[1], best[2], stats.get("n", 0), stats.get("max", 0.0),
                        time.perf_counter() - t_start, count)


def _cache_cases(cuda: bool):
    """(cache_gpu, cpu_attention): all cache on the device, or some off it with/without
    CPU attention (the streaming buffer of footprint() is there as soon as any is off)."""
    return ((100, False), (0, False), (0, True)) if cuda else ((100, False), (0, False))


def _candidates(spec, prof, wl, cuda, elem, caps, stats, shape: Policy) -> list:
    """[(throughput, policy, prediction)] for one block shape: the all-resident policy when
    it fits (nothing is faster), else the LP's best per cache case that is feasible."""
    pol = _resident(spec, shape, elem, wl, cuda, caps)
    pols = [pol] if pol is not None else [solve_candidate(
        spec, Policy.from_dict({**shape.to_dict(), "cache_gpu": cg, "cache_cpu": 100 - cg,
                                "cpu_attention": attn}), prof, wl, cuda, elem, caps, stats)
        for cg, attn in _cache_cases(cuda)]
    out = []
    for pol in pols:
        if pol is not None:
            pred = predict(spec, pol, prof, wl.prompt_len, wl.gen_len, wl.num_prompts,
                           "cuda" if cuda else "cpu", elem)
            out.append((pred.throughput, pol, pred))
    return out


def _b(cap: float) -> int | None:
    return None if math.isinf(cap) else int(cap)


def _resident(spec, shape: Policy, elem, wl, cuda, caps) -> Policy | None:
    """Everything on the compute device, when that fits (no LP needed: nothing is faster)."""
    pol = Policy.from_dict({**shape.to_dict(), "cache_gpu": 100, "cache_cpu": 0,
                            "cpu_attention": False})
    return None if _over(spec, pol, elem, wl, cuda, caps) else pol


def _infeasible_message(spec, prof, wl, cuda, elem, caps, cw, cc) -> str:
    """Name the smallest budget that would work with the smallest block (1 prompt)."""
    shape = Policy(gpu_batch_size=1, num_gpu_batches=1, compress_weight=cw, compress_cache=cc,
                   cache_gpu=0, cache_cpu=100)
    flags = {"gpu": ("GPU", "--gpu-mem"), "cpu": ("CPU", "--cpu-mem"), "disk": ("disk",
                                                                             "--disk-mem")}
    for tier in (("gpu", "cpu", "disk") if cuda else ("cpu", "disk")):
        res = _solve(spec, shape, prof, wl, cuda, elem, caps, minimize_tier=tier)
        if res is None:
            continue
        pol = _round(shape, res[0])
        fp = footprint(spec, pol, elem, wl.prompt_len, wl.gen_len)
        need = fp.total(tier) + (fp.total("gpu") if tier == "cpu" and not cuda else 0)
        what, flag = flags[tier]
        return (f"no policy fits the budgets for {spec.name or spec.arch} with prompts of "
                f"{wl.prompt_len} + {wl.gen_len} tokens: it needs at least {format_size(need)} "
                f"of {what} memory with the smallest block (1 prompt), but {flag} is "
                f"{format_size(getattr(caps, tier))}; raise {flag} (or give disk space with "
                "--disk-mem/--offload-dir)")
    return (f"no policy fits the budgets for {spec.name or spec.arch} even with the smallest "
            "block: raise --gpu-mem / --cpu-mem / --disk-mem")


# ---- entry points -------------------------------------------------------------------------
def search_for_llm(llm) -> Policy:
    """policy="auto" for an LLM being built (prompt/gen lengths default to 512/32)."""
    prof = default_profile(llm.device)
    res = search(llm.spec, prof, getattr(llm, "auto_prompt_len", 512),
                 getattr(llm, "auto_gen_len", 32), llm.gpu_mem, llm.cpu_mem, llm.disk_mem,
                 str(llm.device.type), torch.tensor([], dtype=llm.dtype).element_size(),
                 compress_weight=llm.compress_weight, compress_cache=llm.compress_cache)
    return res.policy


def format_result(res: SearchResult) -> str:
    p, pr = res.policy, res.prediction
    fmt = lambda t: "/".join(f"{x:g}" for x in t)  # noqa: E731
    return "\n".join([
        f"policy: batch {p.gpu_batch_size} x {p.num_gpu_batches}, weights {fmt(p.weights_split())}"
        f", cache {fmt(p.cache_split())}, act {fmt(p.act_split())} (% gpu/cpu/disk), "
        f"cpu_attention {p.cpu_attention}, compress weight/cache "
        f"{p.compress_weight}/{p.compress_cache}",
        f"predicted: prefill {pr.prefill_s:.3f}s, decode {pr.decode_s:.4f}s/step "
        f"({pr.decode_throughput:.1f} tok/s), total {pr.throughput:.2f} tok/s"
        + (" (disk reads from page cache)" if pr.disk_cached else ""),
        "peak memory: " + ", ".join(f"{t} {format_size(v)}" for t, v in pr.peak.items()),
        f"search: {res.candidates} block shapes, {res.lp_solves} LPs (slowest "
        f"{res.lp_max_s * 1e3:.0f} ms) in {res.search_s:.2f}s"])


def search_command(args) -> int:
    """`flexrun policy search ...`: print the policy and its prediction; -o writes JSON."""
    from .models.loader import open_checkpoint
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prof = HardwareProfile.load(args.profile) if args.profile else default_profile(device)
    spec = open_checkpoint(args.model).spec
    res = search(spec, prof, args.prompt_len, args.gen_len, args.gpu_mem, args.cpu_mem,
                 args.disk_mem, device, num_prompts=args.num_prompts,
                 compress_weight=args.compress_weight, compress_cache=args.compress_cache)
    print(format_result(res))
    if args.output:
        cmd = [f"flexrun policy search --model {args.model} --prompt-len {args.prompt_len} "
               f"--gen-len {args.gen_len} --device {device}"]
        for flag in ("gpu_mem", "cpu_mem", "disk_mem", "profile", "num_prompts"):
            if getattr(args, flag) is not None:
                cmd.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}")
        cmd += [f"--{f}" for f in ("compress-weight", "compress-cache")
                if getattr(args, f.replace("-", "_"))]
        res.policy.save(args.output, command=" ".join(cmd + [f"-o {args.output}"]),
                        predicted={**res.prediction.to_dict(), "profile": prof.device_name,
                                   "profile_source": prof.source})
        print(f"policy written to {args.output}")
    return 0
