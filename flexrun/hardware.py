"""HardwareProfile: the bandwidths, compute rates and capacities the cost model needs.

`measure()` times this machine (CUDA parts only when a GPU is visible); `flexrun profile`
writes the result as JSON; `default_profile()` loads a shipped one from policies/profiles/.
All rates are in bytes/s or FLOP/s; a field is None when it was not measured.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import FlexrunError
from .storage import MADV_POPULATE_READ

PROFILES_DIR = Path(__file__).resolve().parent.parent / "policies" / "profiles"
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
    gpu_unit_overhead: float | None = None   # s per unit call at tiny sizes (launch floor)
    gpu_graph_unit_overhead: float | None = None  # the same unit replayed from a CUDA graph
    gpu_w4_bw: float | None = None           # fused 4-bit matmul: packed bytes/s ...
    gpu_w4_flops: float | None = None        # ... plus FLOP/s per row (dequant_triton)
    # CPU compute (fp32; bf16 where measured: CPUs with AVX512-BF16 / AMX run it ~3x faster)
    cpu_flops_decode: float | None = None
    cpu_flops_prefill: float | None = None
    cpu_flops_decode_bf16: float | None = None
    cpu_flops_prefill_bf16: float | None = None
    cpu_decode_m: int = 16
    cpu_mem_bw: float = 10 * _GB             # memcpy bytes/s
    cpu_attn_bw: float | None = None         # KV bytes/s read by decode attention
    cpu_attn_bw_with_h2d: float | None = None   # the same while a pinned H2D copy runs
    cpu_attn_call_s: float | None = None     # s per CPU-attention call of a GPU run beyond
    #                                          its bytes (GPU->host->GPU round trip); fitted
    cpu_unit_overhead: float | None = None   # s per unit call at tiny sizes (dispatch floor)
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

    def gemm_time(self, rows: int, params: int, on_gpu: bool, elem: int = 4) -> float:
        """Seconds of a GEMM of `rows` activation rows by a `params`-element weight: a
        weight-streaming part (fitted so the decode-shape rate is matched) plus FLOPs at the
        prefill-shape rate. Fits both the memory-bound and the compute-bound regime."""
        if on_gpu:
            dec, pre, m = self.gpu_flops_decode, self.gpu_flops_prefill, self.gpu_decode_m
        else:
            (dec, pre), m = self.cpu_rates(elem), self.cpu_decode_m
        stream = max(0.0, m * (1.0 / dec - 1.0 / pre))
        return 2.0 * params * (stream + rows / pre)


def default_profile(device: str | torch.device) -> HardwareProfile:
    """$FLEXRUN_PROFILE if set, else the shipped profile for the device kind (h100.json /
    cpu-2core.json), else a fresh measurement."""
    if os.environ.get("FLEXRUN_PROFILE"):
        return HardwareProfile.load(os.environ["FLEXRUN_PROFILE"])
    kind = torch.device(device).type
    path = PROFILES_DIR / ("h100.json" if kind == "cuda" else "cpu-2core.json")
    if path.is_file():
        return HardwareProfile.load(path)
    return measure(kind)


# ---- measurement --------------------------------------------------------------------------
def _best_time(fn, reps: int = 5, sync=lambda: None, min_s: float = 2e-3) -> float:
    """Seconds per call: fastest of `reps` samples after a warm-up (robust to other
    processes' bursts); a sample repeats short calls to last >= min_s, so launch and
    synchronisation overheads do not count."""
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    inner = max(1, min(100, math.ceil(min_s / max(time.perf_counter() - t0, 1e-9))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / inner)
    return min(times)


def _gemm_rates(device: torch.device, dtype: torch.dtype, dec_m: int, dec_sizes, pre_sizes,
                sync) -> tuple[float, float]:
    """Median FLOP/s over several shapes at decode rows (dec_m) and at prefill shapes."""
    def rate(m, k, n):
        a = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype)
        # samples of >= 20 ms each: a shared VM's CPU-steal bursts outlast 2 ms ones (the
        # 16-row fp32 rate ranged 25-57 GFLOP/s between profiles with 2 ms samples)
        t = _best_time(lambda: torch.nn.functional.linear(a, w), sync=sync,
                       min_s=20e-3 if device.type == "cpu" else 2e-3)
        return 2 * m * k * n / t
    dec = statistics.median(rate(dec_m, s, s) for s in dec_sizes)
    pre = statistics.median(rate(m, s, s) for m, s in pre_sizes)
    return dec, pre


def _attn_bw(device: torch.device, dtype: torch.dtype, sync, shapes) -> float:
    """KV bytes/s of one decode attention step (one query per row) over several shapes, as
    the engine attends (engine.attention.attend)."""
    from .engine.attention import attend
    out = []
    for b, heads, t, hd in shapes:
        q = torch.randn(b, heads, 1, hd, device=device, dtype=dtype)
        k = torch.randn(b, heads, t, hd, device=device, dtype=dtype)
        v = torch.randn_like(k)
        mask = torch.ones(b, 1, 1, t, dtype=torch.bool, device=device)
        sec = _best_time(lambda: attend(q, k, v, mask), sync=sync)
        out.append(2 * k.numel() * k.element_size() / sec)
    return statistics.median(out)


def attention_beside_h2d(dev: torch.device, attn, copy_bytes: int = 256 << 20
                         ) -> tuple[float, float, float]:
    """(s alone, s while pinned host->GPU copies loop, the copies' bytes/s meanwhile) of one
    call of `attn` (CPU attention): both read host DRAM, so the attention slows down."""
    import threading
    host = torch.empty(copy_bytes, dtype=torch.uint8, pin_memory=True)
    devbuf = torch.empty_like(host, device=dev)
    stream, stop, copies = torch.cuda.Stream(dev), threading.Event(), []

    def pump():
        with torch.cuda.stream(stream):
            while not stop.is_set():
                t0 = time.perf_counter()
                devbuf.copy_(host, non_blocking=True)
                stream.synchronize()
                copies.append(time.perf_counter() - t0)
    solo = _best_time(attn)
    th = threading.Thread(target=pump, daemon=True)
    th.start()
    try:
        while not copies and th.is_alive():     # time only once the copies are flowing
            time.sleep(1e-3)
        shared = _best_time(attn)
    finally:
        stop.set()
        th.join()
    return solo, shared, len(copies) * copy_bytes / max(sum(copies), 1e-9)


def _attn_bw_with_h2d(dev: torch.device, alone: float | None,
                      shape=(8, 32, 512, 128)) -> float | None:
    """cpu_attn_bw while host->GPU copies stream (the copy engine keeps its rate): measured
    at one shape and scaled to `alone` (the median over the shapes of cpu_attn_bw)."""
    b, heads, t, hd = shape
    q = torch.randn(b, heads, 1, hd, dtype=torch.float16)
    k, v = (torch.randn(b, heads, t, hd, dtype=torch.float16) for _ in range(2))
    solo, shared, _ = attention_beside_h2d(dev, lambda: F.scaled_dot_product_attention(q, k, v))
    return None if alone is None else alone * solo / shared


def _unit_overhead(device: torch.device, dtype: torch.dtype, sync,
                   graph: bool = False) -> float:
    """Seconds of a decoder layer at tiny sizes (~16 ops): the per-call dispatch/launch floor
    that a unit pays on top of its FLOPs and bytes; with `graph`, of the same layer captured
    once in a CUDA graph and replayed (engine/graphs.py replays resident units' decode)."""
    h, t = 64, 16
    w = [torch.randn(h, h, device=device, dtype=dtype) for _ in range(6)]
    bias, one = (torch.zeros(h, device=device, dtype=dtype) for _ in range(2))
    x = torch.randn(1, 1, h, device=device, dtype=dtype)
    kv = [torch.randn(1, 4, t, 16, device=device, dtype=dtype) for _ in range(2)]
    mask = torch.ones(1, 1, 1, t, dtype=torch.bool, device=device)

    def layer():
        y = F.layer_norm(x, (h,), one, bias)
        q, k, v = (F.linear(y, w[i], bias).view(1, 1, 4, 16).transpose(1, 2) for i in range(3))
        kv[0][:, :, -1:].copy_(k)
        kv[1][:, :, -1:].copy_(v)
        a = F.scaled_dot_product_attention(q, *kv, attn_mask=mask).transpose(1, 2)
        z = x + F.linear(a.reshape(1, 1, h), w[3], bias)
        u = F.layer_norm(z, (h,), one, bias)
        return z + F.linear(torch.relu(F.linear(u, w[4], bias)), w[5], bias)
    if not graph:
        return _best_time(layer, sync=sync, min_s=20e-3)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        layer()                         # warm-up off the capture (lazy inits)
    torch.cuda.current_stream(device).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        layer()
    return _best_time(g.replay, sync=sync, min_s=20e-3)


def _copy_bw(src: torch.Tensor, dst: torch.Tensor, sync) -> float:
    return src.numel() * src.element_size() / _best_time(lambda: dst.copy_(src), sync=sync)


def _disk_rates(offload_dir: str, size: int, chunk: int = 64 << 20) -> dict[str, float]:
    """Bytes/s of one `size`-byte file: written with fsync; read cold (after
    posix_fadvise(DONTNEED), so from the device); read again from the page cache into one
    reused buffer and into a new tensor per chunk (as the disk tier's reads do)."""
    import numpy as np
    path = Path(offload_dir) / f"flexrun-profile-{os.getpid()}.bin"
    buf = np.frombuffer(os.urandom(1 << 20) * (chunk >> 20), dtype=np.uint8).copy()

    def read(fresh: bool, drop: bool) -> float:
        fd = os.open(path, os.O_RDONLY)
        if drop:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        with os.fdopen(fd, "rb", buffering=0) as f:
            while f.readinto(torch.empty(chunk, dtype=torch.uint8).numpy() if fresh else buf):
                pass
        return size / (time.perf_counter() - t0)
    def mapped() -> float:
        """As a CPU run's disk weights are read (storage.DiskTier.map_read)."""
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            mm.madvise(MADV_POPULATE_READ)
        except OSError:                 # older kernels: the pages fault in on first use
            mm.madvise(mmap.MADV_WILLNEED)
            np.frombuffer(mm, dtype=np.uint8)[::4096].sum()
        mm.close()
        return size / (time.perf_counter() - t0)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        t0 = time.perf_counter()
        for off in range(0, size, chunk):
            os.write(fd, memoryview(buf)[:min(chunk, size - off)])
        os.fsync(fd)
        out = {"disk_write": size / (time.perf_counter() - t0)}
        os.close(fd)
        out["disk_read"] = read(fresh=False, drop=True)
        out["disk_read_cached"] = max(read(fresh=False, drop=False) for _ in range(3))
        out["disk_read_cached_fresh"] = max(read(fresh=True, drop=False) for _ in range(3))
        out["disk_map_cached"] = max(mapped() for _ in range(3))
        return out
    except OSError as e:
        raise FlexrunError(f"cannot measure disk speed in {offload_dir}: {e.strerror}") from None
    finally:
        path.unlink(missing_ok=True)


def _cpu_has_bf16() -> bool:
    """Whether the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _host_memory() -> int:
    """Physical memory, or the cgroup limit when one is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            v = Path(p).read_text().strip()
            if v.isdigit():
                total = min(total, int(v))
        except OSError:
            pass
    return total


def measure(device: str | torch.device = "cpu", offload_dir: str | None = None,
            disk_bytes: int = 512 << 20, command: str = "") -> HardwareProfile:
    """Time this machine: CPU GEMM / attention / memcpy, disk, and (with CUDA) the GPU + PCIe."""
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise FlexrunError("--device cuda asked for but no CUDA GPU is visible: use --device cpu")
    offload_dir = offload_dir or tempfile.gettempdir()
    if not os.path.isdir(offload_dir):
        raise FlexrunError(f"offload directory {offload_dir} does not exist")
    cpu = torch.device("cpu")
    nosync = lambda: None  # noqa: E731
    prof = HardwareProfile(device_name=_cpu_name(), cpu_cores=len(os.sched_getaffinity(0)),
                           command=command or f"measure({kind!r}, {offload_dir!r})",
                           date=time.strftime("%Y-%m-%d"), cpu_mem=_host_memory())
    # bf16 at one shape each where the CPU lacks bf16 dot products (slow there: keep it short)
    few = not _cpu_has_bf16()
    for dtype, names in ((torch.float32, ("cpu_flops_decode", "cpu_flops_prefill")),
                         (torch.bfloat16, ("cpu_flops_decode_bf16", "cpu_flops_prefill_bf16"))):
        short = few and dtype == torch.bfloat16
        rates = _gemm_rates(cpu, dtype, prof.cpu_decode_m,
                            (4096,) if short else (3072, 4096, 5120),      # > L3 cache
                            ((256, 1024),) if short else ((256, 1024), (512, 1536), (512, 2048)),
                            nosync)
        for name, rate in zip(names, rates):
            setattr(prof, name, rate)
    # CPU attention runs on the run's dtype: fp16 KV for a CUDA run, fp32 on a CPU run
    attn_dtype = torch.float16 if kind == "cuda" else torch.float32
    prof.cpu_attn_bw = _attn_bw(cpu, attn_dtype, nosync,
                                ((4, 12, 1024, 64), (8, 16, 512, 64), (8, 32, 256, 128)))
    prof.cpu_unit_overhead = _unit_overhead(cpu, torch.float32, nosync)
    a = torch.empty(64 << 20, dtype=torch.float32)
    prof.cpu_mem_bw = _copy_bw(a.normal_(), torch.empty_like(a), nosync)
    del a
    for name, value in _disk_rates(offload_dir, disk_bytes).items():
        setattr(prof, name, value)
    prof.disk_mem = shutil.disk_usage(offload_dir).free
    prof.notes = {"disk_dir": offload_dir, "disk_file_bytes": disk_bytes,
                  "cpu_dtype": "float32", "cpu_attn_dtype": str(attn_dtype),
                  "torch_threads": torch.get_num_threads()}
    if kind == "cuda":
        _measure_cuda(prof)
    return prof


def _measure_cuda(prof: HardwareProfile) -> None:
    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    prof.device_name = torch.cuda.get_device_name(dev)
    prof.gpu_mem = torch.cuda.get_device_properties(dev).total_memory
    h2d, d2h, h2d_pg, d2h_pg = [], [], [], []
    for mb in (256, 512, 1024):
        n = (mb << 20) // 2
        g = torch.empty(n, dtype=torch.float16, device=dev)
        pin = torch.empty(n, dtype=torch.float16, pin_memory=True)
        pg = torch.empty(n, dtype=torch.float16)
        h2d.append(_copy_bw(pin, g, sync))
        d2h.append(_copy_bw(g, pin, sync))
        h2d_pg.append(_copy_bw(pg, g, sync))
        d2h_pg.append(_copy_bw(g, pg, sync))
        del g, pin, pg
    med = statistics.median
    prof.h2d_pinned, prof.d2h_pinned = med(h2d), med(d2h)
    prof.h2d_pageable, prof.d2h_pageable = med(h2d_pg), med(d2h_pg)
    x = torch.empty(512 << 20, dtype=torch.float16, device=dev)
    # copy bandwidth counts both the read and the write (HBM traffic)
    prof.gpu_mem_bw = 2 * _copy_bw(x, torch.empty_like(x), sync)
    del x
    prof.gpu_flops_decode, prof.gpu_flops_prefill = _gemm_rates(
        dev, torch.float16, prof.gpu_decode_m, (4096, 7168, 8192),
        ((4096, 4096), (8192, 8192), (4096, 12288)), sync)
    prof.gpu_attn_bw = _attn_bw(dev, torch.float16, sync,
                                ((32, 32, 1024, 128), (64, 56, 544, 128), (16, 96, 2048, 128)))
    prof.gpu_unit_overhead = _unit_overhead(dev, torch.float16, sync)
    prof.gpu_graph_unit_overhead = _unit_overhead(dev, torch.float16, sync, graph=True)
    prof.cpu_attn_bw_with_h2d = _attn_bw_with_h2d(dev, prof.cpu_attn_bw)
    from . import dequant_triton
    prof.gpu_w4_bw, prof.gpu_w4_flops = dequant_triton.measure_rates(dev) or (None, None)
    prof.notes["gpu_dtype"] = "float16"
    torch.cuda.empty_cache()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


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
            ("disk read cold / write", pair(p.disk_read, p.disk_write, "B/s")),
            ("disk read page cache / into new", pair(p.disk_read_cached,
                                                     p.disk_read_cached_fresh, "B/s")),
            ("disk page cache mapped", _fmt(p.disk_map_cached, "B/s")),
            ("GPU GEMM decode / prefill", pair(p.gpu_flops_decode, p.gpu_flops_prefill, "FLOP/s")),
            ("GPU HBM / attention", pair(p.gpu_mem_bw, p.gpu_attn_bw, "B/s")),
            ("GPU 4-bit matmul bytes / FLOP", pair(p.gpu_w4_bw, p.gpu_w4_flops, "")),
            ("CPU GEMM decode / prefill", pair(p.cpu_flops_decode, p.cpu_flops_prefill, "FLOP/s")),
            ("CPU bf16 GEMM decode / prefill", pair(p.cpu_flops_decode_bf16,
                                                    p.cpu_flops_prefill_bf16, "FLOP/s")),
            ("CPU memcpy / attention", pair(p.cpu_mem_bw, p.cpu_attn_bw, "B/s")),
            ("CPU attention beside H2D", _fmt(p.cpu_attn_bw_with_h2d, "B/s")
             if p.cpu_attn_bw_with_h2d else "-"),
            ("unit call overhead GPU / graphed / CPU", f"{ms(p.gpu_unit_overhead)} / "
                                                       f"{ms(p.gpu_graph_unit_overhead)} / "
                                             f"{ms(p.cpu_unit_overhead)}"),
            ("memory GPU / CPU / disk free", " / ".join(gib(m) for m in (p.gpu_mem, p.cpu_mem,
                                                                         p.disk_mem)))]
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def profile_command(args) -> int:
    """`flexrun profile -o hw.json [--offload-dir D] [--device cuda|cpu]`."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cmd = f"flexrun profile -o {args.output} --device {device}"
    if args.offload_dir:
        cmd += f" --offload-dir {args.offload_dir}"
    prof = measure(device, args.offload_dir, command=cmd)
    prof.save(args.output)
    print(format_profile(prof))
    print(f"profile written to {args.output}")
    return 0
