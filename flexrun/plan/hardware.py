"""HardwareProfile: the bandwidths, compute rates and capacities the cost model needs.

`measuring.measure()` times this machine (CUDA parts only when a GPU is visible); `flexrun
profile` writes the result as JSON; `default_profile()` loads a shipped one from
policies/profiles/.
All rates are in bytes/s or FLOP/s; a field is None when it was not measured.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from flexrun.config import FlexrunError
from flexrun.plan import measuring

PROFILES_DIR = Path(__file__).resolve().parents[2] / "policies" / "profiles"
_GB = 1e9


@dataclass
class HardwareProfile:
    """Measured ceilings of one machine (bytes/s, FLOP/s, bytes)."""
    device_name: str
    cpu_cores: int
    # host <-> GPU copies (None without CUDA)
    h2d_pinned: float | None = None
    d2h_pinned: float | None = None
    h2d_pageable: float | None = None
    d2h_pageable: float | None = None
    h2d_call_s: float | None = None          # s each pinned host->GPU copy costs beyond its
    #                                          bytes, copies issued back to back (1 MB each)
    # disk, large sequential chunks; cold = page cache dropped, cached = read back from it
    disk_read: float = 1.0 * _GB
    disk_write: float = 1.0 * _GB
    disk_read_cached: float | None = None        # page cache -> reused (e.g. pinned) buffers
    disk_read_cached_fresh: float | None = None  # page cache -> freshly allocated buffers
    disk_map_cached: float | None = None   # page cache -> mapped (mmap + populate + unmap)
    # GPU compute (fp16): GEMM rate at decode-ish (gpu_decode_m rows) and prefill-ish shapes
    gpu_flops_decode: float | None = None
    gpu_flops_prefill: float | None = None
    gpu_decode_m: int = 64
    gpu_mem_bw: float | None = None          # HBM copy bytes/s
    gpu_attn_bw: float | None = None         # KV bytes/s read by decode attention
    gpu_qattn_bw: float | None = None        # the same over a 4-bit cache (dense bytes)
    gpu_unit_overhead: float | None = None   # s per unit call at tiny sizes (launch floor)
    gpu_graph_unit_overhead: float | None = None  # the same unit replayed from a CUDA graph
    gpu_w4_bw: float | None = None           # fused 4-bit matmul: packed bytes/s ...
    gpu_w4_flops: float | None = None        # ... plus FLOP/s per row (dequant_triton)
    gpu_expert_bw: float | None = None       # weight bytes/s of a MoE layer's grouped GEMMs
    gpu_w4_expert_call_s: float | None = None   # s per routed 4-bit expert, per-expert route
    #                                          over every expert at decode rows (4 per expert)
    # s of host time per eager decode layer call (one GPU batch) by layer_kind, at tiny sizes:
    # the engine's own layers (cli/layer_calls.py), ~170 launches for a 4-bit MoE layer
    # over a 4-bit cache against gpu_unit_overhead's ~16
    gpu_layer_calls: dict | None = None
    # CPU compute (fp32; bf16 where measured: CPUs with AVX512-BF16 / AMX run it ~3x faster)
    cpu_flops_decode: float | None = None
    cpu_flops_prefill: float | None = None
    cpu_flops_decode_bf16: float | None = None
    cpu_flops_prefill_bf16: float | None = None
    cpu_decode_m: int = 16
    # ... and at fewer decode rows (weights streamed from memory, as cpu_flops_decode)
    cpu_flops_decode_small: float | None = None
    cpu_flops_decode_small_bf16: float | None = None
    cpu_decode_m_small: int = 4
    cpu_mem_bw: float = 10 * _GB             # memcpy bytes/s
    cpu_read_bw: float | None = None         # bytes/s read (a reduction over 256 MB)
    cpu_attn_bw: float | None = None         # KV bytes/s read by decode attention
    cpu_attn_bw_with_h2d: float | None = None   # the same while a pinned H2D copy runs
    cpu_qattn_bw: float | None = None        # dense-equivalent KV bytes/s of CPU attention
    #                                          over a 4-bit cache (dequantize, then attend)
    cpu_attn_call_s: float | None = None     # s per CPU-attention call of a GPU run beyond
    #                                          its bytes (GPU->host->GPU round trip); fitted
    cpu_unit_overhead: float | None = None   # s per unit call at tiny sizes (dispatch floor)
    cpu_expert_bw: float | None = None       # weight bytes/s a CPU expert GEMM (8 rows, fp16)
    #                                          reads: the MoE CPU lane beside the copies
    # what a flexrun process holds before it plans: anonymous RSS once torch (and the CUDA
    # runtime) is loaded, and the device memory of the CUDA context (outside torch's allocator)
    cpu_baseline: int | None = None
    gpu_context: int | None = None
    # capacities
    gpu_mem: int | None = None
    cpu_mem: int = 16 << 30
    disk_mem: int | None = None
    command: str = ""
    source: str = "measured"
    date: str = ""
    notes: dict = field(default_factory=dict)

    # ---- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HardwareProfile":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "HardwareProfile":
        p = Path(path)
        if not p.is_file():
            raise FlexrunError(f"hardware profile {p} not found: make one with "
                               "`flexrun profile -o hw.json`")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise FlexrunError(f"hardware profile {p} is not a valid profile JSON ({e})")

    # ---- derived rates --------------------------------------------------------------------
    def cpu_rates(self, elem: int) -> tuple[float, float]:
        """(decode, prefill) CPU GEMM FLOP/s for elements of `elem` bytes: the bf16 rates
        for 2-byte elements where measured, else the fp32 ones."""
        if elem == 2 and self.cpu_flops_decode_bf16 and self.cpu_flops_prefill_bf16:
            return self.cpu_flops_decode_bf16, self.cpu_flops_prefill_bf16
        return self.cpu_flops_decode, self.cpu_flops_prefill

    def cpu_small_rate(self, elem: int) -> float | None:
        """The CPU GEMM FLOP/s at cpu_decode_m_small rows for elements of `elem` bytes (of
        the same precision as cpu_rates), None where not measured."""
        if elem == 2 and self.cpu_flops_decode_bf16 and self.cpu_flops_prefill_bf16:
            return self.cpu_flops_decode_small_bf16
        return self.cpu_flops_decode_small

    def gemm_time(self, rows: int, params: int, on_gpu: bool, elem: int = 4) -> float:
        """Seconds of a GEMM of `rows` activation rows by a `params`-element weight: a
        weight-streaming part (fitted so the decode-shape rate is matched) plus FLOPs at the
        prefill-shape rate. Fits both the memory-bound and the compute-bound regime. On the
        CPU, fewer rows than cpu_decode_m are timed on the line through both decode rates
        where the profile has the one at cpu_decode_m_small rows: a few-row GEMM takes less
        than the cpu_decode_m point less the prefill rate's FLOPs of the missing rows (4 x
        4096 x 4096 fp32, weights streamed: 4.7 ms measured against 6.2 ms; 2-core dev VM)."""
        if on_gpu:
            dec, pre, m = self.gpu_flops_decode, self.gpu_flops_prefill, self.gpu_decode_m
        else:
            (dec, pre), m = self.cpu_rates(elem), self.cpu_decode_m
            small, ms = self.cpu_small_rate(elem), self.cpu_decode_m_small
            if small and rows < m and ms < m:
                t_small, t_m = ms / small, m / dec        # seconds per FLOP-pair per param
                per = t_small + (rows - ms) * (t_m - t_small) / (m - ms)
                return 2.0 * params * max(per, rows / pre)
        stream = max(0.0, m * (1.0 / dec - 1.0 / pre))
        return 2.0 * params * (stream + rows / pre)


def profile_path(device: str | torch.device) -> Path:
    """The shipped profile default_profile() loads for the device kind: on CUDA the one of
    policies/profiles/ whose device_name is the GPU present (h100.json first), else
    h100.json; on the CPU cpu-2core.json."""
    default = PROFILES_DIR / "h100.json"
    if torch.device(device).type != "cuda":
        return PROFILES_DIR / "cpu-2core.json"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for path in [default] + sorted(set(PROFILES_DIR.glob("*.json")) - {default}):
            try:
                if json.loads(path.read_text()).get("device_name") == name:
                    return path
            except (OSError, json.JSONDecodeError):
                continue
    return default


def host_facts() -> tuple[int, int]:
    """(CPU cores this process may use, host memory bytes)."""
    return len(os.sched_getaffinity(0)), host_memory()


def same_host(prof: HardwareProfile, cores: int, mem: int, slack: float = 0.25) -> bool:
    """Whether a profile was measured on a host like this one: cores and memory within
    `slack` (a 2-GPU host's 32 cores and 270 GB are not a 16-core, 125 GiB machine's:
    its pageable copies, CPU attention and page cache differ)."""
    def near(a: float, b: float) -> bool:
        return b > 0 and abs(a - b) <= slack * b
    return near(cores, prof.cpu_cores) and near(mem, prof.cpu_mem)


def matching_profile(device: str | torch.device) -> Path | None:
    """The shipped profile of this device and host: the GPU present by name (CUDA) or a
    CPU-only profile (CPU), measured on a host with about these cores and memory."""
    cuda = torch.device(device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name() if cuda else None
    cores, mem = host_facts()
    for path in sorted(PROFILES_DIR.glob("*.json")):
        try:
            prof = HardwareProfile.load(path)
        except FlexrunError:
            continue
        kind_ok = prof.device_name == name if cuda else prof.h2d_pinned is None
        if kind_ok and same_host(prof, cores, mem):
            return path
    return None


def cache_path(device: str | torch.device) -> Path:
    """Where a profile measured on first use is kept: the user's cache directory
    (FLEXRUN_CACHE, else ~/.cache/flexrun), one file per device and host."""
    cuda = torch.device(device).type == "cuda"
    name = torch.cuda.get_device_name() if cuda and torch.cuda.is_available() else "cpu"
    cores, mem = host_facts()
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()
    root = Path(os.environ.get("FLEXRUN_CACHE") or Path.home() / ".cache" / "flexrun")
    return root / "profiles" / f"{slug}-{cores}c-{round(mem / 2**30)}g.json"


def profile_source(device: str | torch.device) -> str:
    """Which profile default_profile(device) loads, as a results file names it: the file of
    $FLEXRUN_PROFILE, a shipped profile (policies/profiles/<name>) or the cached measurement."""
    if os.environ.get("FLEXRUN_PROFILE"):
        return os.environ["FLEXRUN_PROFILE"]
    path = matching_profile(device)
    if path is None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        path = profile_path(device)
    return f"policies/profiles/{path.name}" if path is not None else str(cache_path(device))


def default_profile(device: str | torch.device) -> HardwareProfile:
    """$FLEXRUN_PROFILE if set; else the shipped profile of this GPU and host
    (matching_profile); else one measured on this machine before (cache_path); else measure
    one now, say so in one line and cache it. Planning for a GPU not present: the shipped
    profile of profile_path."""
    if os.environ.get("FLEXRUN_PROFILE"):
        return HardwareProfile.load(os.environ["FLEXRUN_PROFILE"])
    path = matching_profile(device)
    if path is not None:
        return fill_missing_terms(HardwareProfile.load(path), path)
    cuda = torch.device(device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        return HardwareProfile.load(profile_path(device))
    cached = cache_path(device)
    if cached.is_file():
        try:        # (cached before a term existed: lent it now)
            return fill_missing_terms(HardwareProfile.load(cached), cached)
        except FlexrunError:
            pass
    print(f"flexrun: no shipped hardware profile matches this machine ({host_facts()[0]} cores, "
          f"{host_memory() / 2**30:.0f} GiB): measuring one (about 20 s), kept in {cached}",
          file=sys.stderr, flush=True)
    prof = measure(torch.device(device).type, command="flexrun profile (first use)")
    fill_missing_terms(prof)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        prof.save(cached)
        os.chmod(cached, 0o600)
    except OSError:
        pass
    return prof


# terms a profile may lack (fitted to runs, or measured by a micro-benchmark younger than the
# profile) and where a shipped profile may lend them from: "host" terms (a GPU->host->GPU round
# trip per CPU-attention call is the host's cost) from a profile of the same GPU, else of a
# host like its own; "gpu" terms only from a profile of the same GPU
LENT_TERMS = {"cpu_attn_call_s": "host", "gpu_graph_unit_overhead": "gpu",
              "gpu_expert_bw": "gpu", "h2d_call_s": "gpu", "gpu_w4_expert_call_s": "gpu",
              "gpu_layer_calls": "host"}


def layer_kind(moe: bool, w4: bool, kv4: bool) -> str:
    """The key of a decoder layer's eager call in gpu_layer_calls: dense or moe, with _w4
    for 4-bit weights and _kv4 for a 4-bit KV cache."""
    return ("moe" if moe else "dense") + ("_w4" if w4 else "") + ("_kv4" if kv4 else "")


def fill_missing_terms(prof: HardwareProfile, own: Path | None = None) -> HardwareProfile:
    """prof with the LENT_TERMS it lacks taken from a shipped profile (not `own`, its own
    file), noted in prof.notes. A profile older than a term would otherwise plan as if it
    were 0 (an H100 profile without cpu_attn_call_s picked 2 x 128 for Qwen3-30B-A3B: 6,144
    calls per step) or absent (without gpu_graph_unit_overhead every graphed unit paid an
    eager launch: OPT-1.3B's resident decode predicted at 2.4x its measured step)."""
    missing = [n for n in LENT_TERMS if getattr(prof, n) is None]
    if not missing or prof.h2d_pinned is None:      # a CPU profile: the terms are GPU runs'
        return prof
    shipped = []
    for path in sorted(PROFILES_DIR.glob("*.json")):
        try:
            shipped.append((path, HardwareProfile.load(path)))
        except FlexrunError:
            continue
    same_gpu = [x for x in shipped if x[1].device_name == prof.device_name]
    like_host = [x for x in shipped if x[1].device_name != prof.device_name and x[1].h2d_pinned
                 and same_host(x[1], prof.cpu_cores, prof.cpu_mem)]
    for name in missing:
        for path, base in same_gpu + (like_host if LENT_TERMS[name] == "host" else []):
            if path != own and getattr(base, name) is not None:
                setattr(prof, name, getattr(base, name))
                prof.notes[name] = f"from {path.name} (not measured here)"
                break
    return prof


# ---- measurement --------------------------------------------------------------------------
def read_int(path: str) -> int | None:
    """The integer a (sysfs / cgroup) file holds, None when absent or not a number."""
    try:
        v = Path(path).read_text().strip()
    except OSError:
        return None
    return int(v) if v.isdigit() else None


def host_memory() -> int:
    """Physical memory, or the cgroup limit when one is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        limit = read_int(p)
        if limit is not None:
            total = min(total, limit)
    return total


def measure(device: str | torch.device = "cpu", offload_dir: str | None = None,
            disk_bytes: int = 512 << 20, command: str = "") -> HardwareProfile:
    """Time this machine (plan/measuring.py): CPU GEMM / attention / memcpy, disk, and (with
    CUDA) the GPU + PCIe."""
    kind = torch.device(device).type
    offload_dir = offload_dir or tempfile.gettempdir()
    cores, mem = host_facts()
    prof = HardwareProfile(device_name="cpu", cpu_cores=cores,
                           command=command or f"measure({kind!r}, {offload_dir!r})",
                           date=time.strftime("%Y-%m-%d"), cpu_mem=mem)
    measuring.fill(prof, kind, offload_dir, disk_bytes)
    return prof


# ---- CLI ----------------------------------------------------------------------------------
def _fmt(v, unit: str) -> str:
    if v is None:
        return "-"
    return f"{v / 1e12:.1f} T{unit}" if v >= 1e12 else f"{v / 1e9:.2f} G{unit}"


def format_profile(p: HardwareProfile) -> str:
    """A short table of a profile."""
    def pair(a, b, unit):
        return f"{_fmt(a, unit)} / {_fmt(b, unit)}"
    ms = lambda v: "-" if v is None else f"{v * 1e3:.3f} ms"  # noqa: E731
    gib = lambda m: "-" if m is None else f"{m / 2**30:.1f} GiB"  # noqa: E731
    rows = [("device", p.device_name),
            ("H2D pinned / pageable", pair(p.h2d_pinned, p.h2d_pageable, "B/s")),
            ("D2H pinned / pageable", pair(p.d2h_pinned, p.d2h_pageable, "B/s")),
            ("H2D fixed cost per copy (1 MB copies)", ms(p.h2d_call_s)),
            ("disk read cold / write", pair(p.disk_read, p.disk_write, "B/s")),
            ("disk read page cache / into new", pair(p.disk_read_cached,
                                                     p.disk_read_cached_fresh, "B/s")),
            ("disk page cache mapped", _fmt(p.disk_map_cached, "B/s")),
            ("GPU GEMM decode / prefill", pair(p.gpu_flops_decode, p.gpu_flops_prefill, "FLOP/s")),
            ("GPU HBM / attention", pair(p.gpu_mem_bw, p.gpu_attn_bw, "B/s")),
            ("GPU attention over a 4-bit cache (dense bytes)", _fmt(p.gpu_qattn_bw, "B/s")),
            ("GPU 4-bit matmul bytes / FLOP", pair(p.gpu_w4_bw, p.gpu_w4_flops, "")),
            ("CPU GEMM decode / prefill", pair(p.cpu_flops_decode, p.cpu_flops_prefill, "FLOP/s")),
            ("CPU bf16 GEMM decode / prefill", pair(p.cpu_flops_decode_bf16,
                                                    p.cpu_flops_prefill_bf16, "FLOP/s")),
            (f"CPU GEMM at {p.cpu_decode_m_small} rows fp32 / bf16",
             pair(p.cpu_flops_decode_small, p.cpu_flops_decode_small_bf16, "FLOP/s")),
            ("CPU memcpy / attention", pair(p.cpu_mem_bw, p.cpu_attn_bw, "B/s")),
            ("CPU read", _fmt(p.cpu_read_bw, "B/s") if p.cpu_read_bw else "-"),
            ("CPU attention over a 4-bit cache (dense bytes)", _fmt(p.cpu_qattn_bw, "B/s")
             if p.cpu_qattn_bw else "-"),
            ("CPU attention beside H2D", _fmt(p.cpu_attn_bw_with_h2d, "B/s")
             if p.cpu_attn_bw_with_h2d else "-"),
            ("CPU expert GEMM (fp16, 8 rows)", _fmt(p.cpu_expert_bw, "B/s")
             if p.cpu_expert_bw else "-"),
            ("GPU grouped expert GEMMs (fp16, 4 rows each)", _fmt(p.gpu_expert_bw, "B/s")
             if p.gpu_expert_bw else "-"),
            ("GPU 4-bit expert call, per-expert route", ms(p.gpu_w4_expert_call_s)),
            ("GPU eager layer call by kind", ", ".join(
                f"{k} {ms(v)}" for k, v in (p.gpu_layer_calls or {}).items()) or "-"),
            ("unit call overhead GPU / graphed / CPU", f"{ms(p.gpu_unit_overhead)} / "
                                                       f"{ms(p.gpu_graph_unit_overhead)} / "
                                             f"{ms(p.cpu_unit_overhead)}"),
            ("memory GPU / CPU / disk free", " / ".join(gib(m) for m in (p.gpu_mem, p.cpu_mem,
                                                                         p.disk_mem))),
            ("held before a run: CPU baseline / CUDA context",
             " / ".join("-" if m is None else f"{m / 2**20:.0f} MiB"
                        for m in (p.cpu_baseline, p.gpu_context)))]
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
