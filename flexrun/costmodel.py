"""FlexGen-style cost model: per-unit time terms, an LP over placement, a search over blocks.

Time of one unit (embedding, decoder layer, head) for one block is a sum of *terms* that are
linear in the placement fractions (wg..ad: weights/cache/activations on gpu/cpu/disk).
Terms on different STREAMS overlap (time = max over streams) when policy.overlap is set.
docs/costmodel.md has the formulas.
"""
from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass, field

import torch

from .config import FlexrunError, Policy, format_size, parse_size
from .footprint import check_budget, footprint, is_compressible, numel, weight_bytes
from .hardware import HardwareProfile, default_profile
from .models.spec import ModelSpec

VARS = ("wg", "wc", "wd", "cg", "cc", "cd", "ag", "ac", "ad")
# terms that run concurrently (pipeline.py: weights load on the io thread / weight stream,
# KV and activation stores on the store stream; KV and activation loads are synchronous
# with compute). A CPU run has one stream: its reads are copies and page faults on the
# cores the compute uses.
STREAMS = (("compute", "cache_load", "act_load"), ("weights",), ("cache_store", "act_store"))
RESOURCES = ("compute", "weights", "cache_load", "cache_store", "act_load", "act_store")
PAGE_CACHE_SHARE = 0.9     # disk data read back from the page cache when it fits in this share
MMAP_MAX = 32 << 20        # glibc's largest mmap threshold: bigger tensors are fresh mappings
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
    blocks: int                      # blocks in the run (num_prompts / block, rounded up)
    throughput: float                # generated tokens / s over the whole run
    decode_throughput: float         # tokens / s of the decode steps alone
    peak: dict                       # peak bytes per tier ("gpu", "cpu", "disk")
    breakdown: dict = field(default_factory=dict)   # phase -> resource -> s per block
    disk_cached: bool = False        # disk reads assumed served from the page cache

    def to_dict(self) -> dict:
        return {"prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "block_s": self.block_s, "blocks": self.blocks, "throughput_tok_s": self.throughput,
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
        self.mem_bw = prof.gpu_mem_bw if cuda else prof.cpu_mem_bw
        self.cpu_attn_bw = prof.cpu_attn_bw or prof.cpu_mem_bw
        self.attn_bw = (prof.gpu_attn_bw or prof.gpu_mem_bw) if cuda else self.cpu_attn_bw
        self.flops_pre = prof.gpu_flops_prefill if cuda else prof.cpu_flops_prefill
        self.overhead = (prof.gpu_unit_overhead if cuda else prof.cpu_unit_overhead) or 0.0
        # per unit kind (embed, layer, head): stored bytes, GEMM parameters, compressed params
        self.unit_bytes, self.unit_read, self.unit_params, self.unit_qparams = [], [], [], []
        for kind, u in enumerate((0, 1, spec.num_layers + 1)):
            shapes = spec.unit_shapes(u)
            sizes = [weight_bytes(n, s, elem, policy) for n, s in shapes.items()]
            self.unit_bytes.append(sum(sizes))
            self.unit_read.append(sum(self.read_s(x) for x in sizes))
            skip = ("embed.tokens", "embed.positions") if kind == 0 else ()
            self.unit_params.append(sum(numel(s) for n, s in shapes.items()
                                        if len(s) == 2 and n not in skip))
            self.unit_qparams.append(sum(numel(s) for n, s in shapes.items()
                                         if policy.compress_weight and is_compressible(n, s)))
        self.kv_elem = (policy.quant_bits / 8 + 4 / policy.quant_group) \
            if policy.compress_cache else elem          # stored bytes per cache value

    def read_s(self, nbytes: float, parts: int = 1) -> float:
        """Seconds to read nbytes (in `parts` equal tensors) from the disk tier to host."""
        return nbytes / (self.disk_r_new if nbytes / parts > MMAP_MAX else self.disk_r)

    def io(self, nbytes: float, cpu: str, disk: str, load: bool, pinned: bool = True) -> Lin:
        """Seconds to move nbytes between the compute device and the cpu / disk tier."""
        link = (self.h2d if pinned else self.h2d_pg) if load else \
            (self.d2h if pinned else self.d2h_pg)
        return {cpu: nbytes / link,
                disk: nbytes / link + nbytes / (self.disk_r if load else self.disk_w)}

    def unit_terms(self, kind: int, prefill: bool) -> dict[str, Lin]:
        """Terms of one unit (0 embed, 1 layer, 2 head) for one step of the whole block."""
        s, p, e, cuda, gemm = self.spec, self.p, self.e, self.cuda, self.prof.gemm_time
        b, k, P = p.gpu_batch_size, p.num_gpu_batches, self.wl.prompt_len
        rows = b * P if prefill else b
        wb = self.unit_bytes[kind]
        weights = {"wc": wb / self.h2d_w, "wd": self.unit_read[kind] + wb / self.h2d_w}
        # compressed weights are decompressed for every batch on the compute device
        comp = _lin(k * self.unit_qparams[kind] * (e + p.quant_bits / 8) / self.mem_bw)
        if kind != 1:                       # embedding gather / head GEMM on the last token
            comp["1"] += k * (gemm(rows, self.unit_params[0], cuda) + 2 * rows * s.hidden_size
                              * e / self.mem_bw if kind == 0 else gemm(b, self.unit_params[2],
                              cuda) + 4 * b * s.vocab_size / self.mem_bw)
            return {"compute": self._floor(comp), "weights": weights}
        misc = rows * (12 * s.hidden_size + 3 * s.ffn_dim) * e / self.mem_bw  # norms, adds..
        comp["1"] += k * (gemm(rows, self.unit_params[1], cuda) + misc)
        t_avg = P if prefill else P + self.wl.gen_len / 2.0    # keys of an average step
        kv = 2 * b * k * t_avg * s.kv_dim * self.kv_elem       # the block's keys + values
        new = 2 * b * k * s.kv_dim * self.kv_elem              # this step's keys + values
        load: Lin = {}
        if prefill:
            comp["1"] += k * 4.0 * b * P * P * s.num_heads * s.head_dim / self.flops_pre
            store = self.io(kv, "cc", "cd", False) if cuda else {"cd": kv / self.disk_w}
        elif not cuda or p.cpu_attention:   # attention where the cache lives (host memory)
            load, store = {"cd": self.read_s(kv, 2 * k)}, {"cd": new / self.disk_w}
            if not cuda:
                comp["1"] += kv / self.attn_bw
            else:                           # ship q/k/v of the new token and the output back
                ship = b * k * (2 * s.num_heads * s.head_dim + 2 * s.kv_dim) * e / self.h2d
                host = kv / self.cpu_attn_bw + ship
                comp = _add(comp, {"cg": kv / self.attn_bw, "cc": host, "cd": host})
        else:                               # bring the prefix to the GPU, attend there
            comp["1"] += kv / self.attn_bw
            load, store = self.io(kv, "cc", "cd", True), self.io(new, "cc", "cd", False)
        act = b * k * (P if prefill else 1) * s.hidden_size * e
        if cuda:
            act_in, act_out = (self.io(act, "ac", "ad", ld, False) for ld in (True, False))
        else:
            act_in, act_out = {"ad": self.read_s(act, k)}, {"ad": act / self.disk_w}
        return {"compute": self._floor(comp), "weights": weights,
                **{name: _add(_lin(), t) for name, t in (
                    ("cache_load", load), ("cache_store", store), ("act_load", act_in),
                    ("act_store", act_out))}}

    def _floor(self, comp: Lin) -> Lin:
        """Add the per-call dispatch floor of the k batches: on a GPU kernels launch ahead
        asynchronously, so the device work only shows when it exceeds the launch time."""
        floor = self.p.num_gpu_batches * self.overhead
        comp["1"] = max(comp["1"], floor) if self.cuda else comp["1"] + floor
        return comp

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


def _disk_cached(prof: HardwareProfile, disk: float, host: float) -> bool:
    """Data on the disk tier is read back from the page cache when it fits in spare RAM."""
    return (prof.disk_read_cached is not None and disk > 0
            and disk + host <= PAGE_CACHE_SHARE * prof.cpu_mem)


def predict(spec: ModelSpec, policy: Policy, profile: HardwareProfile, prompt_len: int,
            gen_len: int, num_prompts: int | None = None, device: str | None = None,
            dtype_bytes: int | None = None, disk_cached: bool | None = None,
            fp=None) -> Prediction:
    """Predicted prefill / decode times and throughput of any `policy` (e.g. to print
    predicted vs measured next to a benchmark). device None: cuda when the profile has GPU
    rates; dtype_bytes None: 2 on cuda, 4 on cpu; disk_cached None: decided from memory."""
    device = device or ("cuda" if profile.gpu_flops_prefill else "cpu")
    cuda = torch.device(device).type == "cuda"
    elem = dtype_bytes or (2 if cuda else 4)
    fp = fp or footprint(spec, policy, elem, prompt_len, gen_len)
    if disk_cached is None:
        host = fp.total("cpu") + (0 if cuda else fp.total("gpu"))
        disk_cached = _disk_cached(profile, fp.total("disk"), host)
    ctx = _Ctx(spec, policy, profile, Workload(prompt_len, gen_len, num_prompts), cuda, elem,
               disk_cached)
    x = _fractions(policy)
    times, breakdown = {}, {}
    for name, reps, groups in ctx.phases():
        times[name] = sum(cnt * _unit_time(t, x, policy.overlap and cuda) for cnt, t in groups)
        breakdown[name] = {r: sum(cnt * _value(t[r], x) for cnt, t in groups if r in t)
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


# ---- the LP for one block shape, and the search over shapes -------------------------------
@functools.lru_cache(maxsize=1)
def _solver():
    """HiGHS through highspy, else HiGHS's binary, else CBC (whichever this pulp can run)."""
    import pulp
    for name in ("HiGHS", "HiGHS_CMD", "PULP_CBC_CMD"):
        cls = getattr(pulp, name, None)
        if cls is not None and cls(msg=False).available():
            return cls(msg=False)
    raise FlexrunError("no LP solver found: install highspy (pip install highspy)")


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
        self.memo: dict = {}
        self.lp_n, self.lp_max = 0, 0.0

    def fp(self, pol: Policy, lengths: bool = True):
        key = (tuple(pol.to_dict().values()), lengths)
        if key not in self.memo:
            P, G = (self.wl.prompt_len, self.wl.gen_len) if lengths else (None, None)
            self.memo[key] = footprint(self.spec, pol, self.elem, P, G)
        return self.memo[key]

    def use(self, pol: Policy) -> dict[str, float]:
        """Peak bytes per budget ("gpu" / "cpu" / "disk"); CPU runs put both tiers in RAM."""
        fp = self.fp(pol)
        use = {t: fp.total(t) for t in ("gpu", "cpu", "disk")}
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
        gpu = _lin(fp0.buffers + 2 * unit, wg=W - 2 * unit, cg=C)
        cpu = _lin(fp0.host + unit, wg=-unit, wc=W, cc=C)
        if not self.cuda:
            gpu, cpu = _lin(), _add(gpu, cpu)
        return {"gpu": gpu, "cpu": cpu, "disk": _lin(wd=W, cd=C)}, W + C + fp0.buffers + fp0.host

    def solve(self, shape: Policy, caps: dict, minimize: str | None = None):
        """Optimal fractions (dict) of the LP, or None when infeasible."""
        import pulp
        t0 = time.perf_counter()
        mem, everything = self.memory(shape)
        ctx = _Ctx(self.spec, shape, self.prof, self.wl, self.cuda, self.elem,
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
        for tier, e in mem.items():
            if tier != minimize and len(e) > 1 and math.isfinite(caps[tier]):
                lp += expr(e) <= caps[tier]
        objective = []
        for name, reps, groups in ctx.phases():
            for i, (cnt, terms) in enumerate(groups):     # epigraph variable per unit kind
                t = new_var(f"t_{name}_{i}", 0)
                for group in STREAMS if shape.overlap and self.cuda else (RESOURCES,):
                    lp += t >= pulp.lpSum(expr(terms[r]) for r in group if r in terms)
                objective.append(reps * cnt * t)
        lp += expr(mem[minimize]) if minimize else pulp.lpSum(objective)
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

    def candidates(self, shape: Policy) -> list[tuple[float, Policy, Prediction]]:
        """The all-resident policy when it fits (nothing is faster for this block), else the
        LP's policy for each cache case: all on device, or off it with/without CPU attention."""
        resident = _with(shape, cache_gpu=100, cache_cpu=0, cpu_attention=False)
        if not self.over(resident, self.caps):
            pols = [resident]
        else:
            cases = ((100, False), (0, False), (0, True)) if self.cuda else ((100, False),
                                                                            (0, False))
            pols = [self._place_or_least(_with(shape, cache_gpu=cg, cache_cpu=100 - cg,
                                               cpu_attention=a)) for cg, a in cases]
        out = []
        for pol in filter(None, pols):
            pred = predict(self.spec, pol, self.prof, self.wl.prompt_len, self.wl.gen_len,
                           self.wl.num_prompts, "cuda" if self.cuda else "cpu", self.elem,
                           fp=self.fp(pol))
            out.append((pred.throughput, pol, pred))
        return out

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

    A GPU budget above 90% of the device's memory is cut to that: the CUDA context and the
    allocator's fragmentation need the rest (an 80 GiB budget on an 80 GB H100 ran out)."""
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
           compress_weight: bool = False, compress_cache: bool = False) -> SearchResult:
    """The policy of highest predicted throughput within the budgets: an LP over placement
    for each (gpu_batch_size, num_gpu_batches, cache case, compression)."""
    t0 = time.perf_counter()
    cuda = torch.device(device).type == "cuda"
    elem = dtype_bytes or (2 if cuda else 4)
    caps = _caps(profile, cuda, gpu_mem, cpu_mem, disk_mem)
    s = _Search(spec, profile, Workload(prompt_len, gen_len, num_prompts), cuda, elem, caps)
    max_block = num_prompts or (4096 if cuda else 256)
    sizes = sorted({2 ** i for i in range(11)} | {3 * 2 ** i for i in range(2, 9)})
    best, shapes = _scan(s, sizes, max_block, cuda, compress_weight, compress_cache)
    if best is None:    # second pass: also try each tier's least-use placement (slower)
        s.fallback = True
        best, more = _scan(s, sizes, max_block, cuda, compress_weight, compress_cache)
        shapes += more
    if best is None:
        smallest = Policy(gpu_batch_size=1, compress_weight=compress_weight,
                          compress_cache=compress_cache)
        raise FlexrunError(s.minimum_message(smallest))
    lim = {t: None if math.isinf(v) else int(v) for t, v in caps.items()}
    check_budget(spec, best[1], torch.device(device), _DTYPES[elem], lim["gpu"], lim["cpu"],
                 lim["disk"], prompt_len, gen_len)
    return SearchResult(best[1], best[2], s.lp_n, s.lp_max, time.perf_counter() - t0, shapes)


def _scan(s, sizes, max_block: int, cuda: bool, compress_weight: bool, compress_cache: bool):
    """The best (throughput, policy, prediction) over block shapes and compression cases."""
    best, shapes = None, 0
    for cw in sorted({False, compress_weight}):
        for cc in sorted({False, compress_cache}):
            for b in (v for v in sizes if v <= min(max_block, 1024 if cuda else 256)):
                fits_b = False
                for k in (2 ** i for i in range(8)):
                    if b * k > max_block:
                        break
                    found = s.candidates(Policy(gpu_batch_size=b, num_gpu_batches=k,
                                                compress_weight=cw, compress_cache=cc))
                    shapes, fits_b = shapes + 1, fits_b or bool(found)
                    for f in found:
                        if best is None or f[0] > best[0] * (1 + 1e-9):
                            best = f
                    if not found or any(f[1].weights_gpu == 100 == f[1].cache_gpu
                                        for f in found):
                        break   # larger blocks: more memory, and no gain once all resident
                if not fits_b:
                    break       # a larger batch needs more memory still
    return best, shapes


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
        flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                 for k, v in vars(args).items() if k not in ("cmd", "policy_cmd", "output",
                                                             "device") and v not in (None, False)]
        cmd = " ".join(["flexrun policy search", *flags, f"--device {device}",
                        f"-o {args.output}"])
        res.policy.save(args.output, command=cmd,
                        predicted={**res.prediction.to_dict(), "profile": prof.device_name,
                                   "profile_source": prof.source})
        print(f"policy written to {args.output}")
    return 0
