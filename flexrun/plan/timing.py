"""Timings of one machine's parts for the hardware profile: GEMMs, decode attention, copies,
a tiny decoder layer (eager and replayed from a CUDA graph) and the disk tier's reads."""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flexrun.config import FlexrunError
from flexrun.kernels import dequant
from flexrun.memory.quant import compress
from flexrun.memory.disk import map_pages


def best_time(fn, reps: int = 5, sync=lambda: None, min_s: float = 2e-3) -> float:
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


def cache_bytes() -> int:
    """Bytes of the last-level CPU caches this process's CPUs share (sysfs; the distinct
    instances summed), 32 MiB where unknown."""
    sizes: dict[str, int] = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        best = None
        for d in Path(f"/sys/devices/system/cpu/cpu{cpu}/cache").glob("index*"):
            try:
                level, size = int((d / "level").read_text()), (d / "size").read_text().strip()
                shared = (d / "shared_cpu_list").read_text().strip()
            except (OSError, ValueError):
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
            if best is None or level > best[0]:
                best = (level, shared, int(size.rstrip("KMG")) * mult)
        if best is not None:
            sizes[best[1]] = best[2]
    return sum(sizes.values()) or 32 << 20


def decode_rates(device: torch.device, dtype: torch.dtype, rows: tuple[int, ...], sizes, sync,
                 stream_bytes: int = 0) -> list[float]:
    """For each row count m in `rows`, the median FLOP/s of m-row GEMMs by square weights of
    `sizes`, the weights as a run stores them (pre-packed for oneDNN on a bf16 CPU run). With
    stream_bytes, each sample multiplies distinct copies of the weight that together exceed
    stream_bytes, one after another, as a decode step reads each weight once: a weight used
    again and again stays in the CPU's caches (480 MiB of L3 on the 2-core dev VM) and is
    read there 1.7-2x faster than from memory."""
    from flexrun.memory import packed as packed_weights
    packs = packed_weights.applies(device, dtype, compress_weight=False)
    out: dict[int, list[float]] = {m: [] for m in rows}
    for s in sizes:
        w = torch.randn(s, s, device=device, dtype=dtype)
        copies = max(1, -(-stream_bytes // (w.numel() * w.element_size())))
        plain = None if packs else [w] + [w.clone() for _ in range(copies - 1)]
        for m in rows:
            if packs:       # oneDNN's layout depends on the row count it is packed for
                p = packed_weights.pack(w, m)
                fns = [q.linear for q in [p] + [dataclasses.replace(p, data=p.data.clone())
                                                for _ in range(copies - 1)]]
            else:
                fns = [lambda x, q=q: F.linear(x, q) for q in plain]
            a = torch.randn(m, s, device=device, dtype=dtype)

            def run(fns=fns, a=a):
                for fn in fns:
                    fn(a)
            # samples of >= 20 ms each: a shared VM's CPU-steal bursts outlast 2 ms ones (the
            # 16-row fp32 rate ranged 25-57 GFLOP/s between profiles with 2 ms samples)
            t = best_time(run, sync=sync, min_s=20e-3 if device.type == "cpu" else 2e-3)
            out[m].append(2 * m * s * s * copies / t)
            del fns
        del plain
    return [statistics.median(out[m]) for m in rows]


def prefill_rate(device: torch.device, dtype: torch.dtype, shapes, sync) -> float:
    """Median FLOP/s of (m x s) by (s x s) GEMMs over `shapes` (m, s), the weights as a run
    stores them."""
    from flexrun.memory import packed as packed_weights
    packs = packed_weights.applies(device, dtype, compress_weight=False)

    def rate(m, s):
        a = torch.randn(m, s, device=device, dtype=dtype)
        w = torch.randn(s, s, device=device, dtype=dtype)
        fn = packed_weights.pack(w, m).linear if packs else lambda x: F.linear(x, w)
        t = best_time(lambda: fn(a), sync=sync, min_s=20e-3 if device.type == "cpu" else 2e-3)
        return 2 * m * s * s / t
    return statistics.median(rate(m, s) for m, s in shapes)


def gemm_rates(device: torch.device, dtype: torch.dtype, dec_m: int, dec_sizes, pre_sizes,
               sync) -> tuple[float, float]:
    """Median FLOP/s over several shapes at decode rows (dec_m, each weight used again and
    again) and at prefill shapes."""
    return (decode_rates(device, dtype, (dec_m,), dec_sizes, sync)[0],
            prefill_rate(device, dtype, pre_sizes, sync))


def dram_shapes(shapes, nbytes: int, elem: int) -> list[tuple[int, int, int, int]]:
    """The decode attention geometries (rows, heads, keys, head dim) of `shapes`, each with as
    many rows as make its keys and values at least nbytes: a KV cache smaller than the CPU's
    last-level cache is read there, not from DRAM (the three shapes of 12-34 MB read at 111
    GB/s on the 32-core H200 host, an OPT-30B block's 475 MB at 61 GB/s on the 16-core one)."""
    return [(max(b, -(-nbytes // (2 * h * t * d * elem))), h, t, d) for b, h, t, d in shapes]


def attn_bw(device: torch.device, dtype: torch.dtype, sync, shapes) -> float:
    """KV bytes/s of one decode attention step (one query per row) over several shapes, as
    the engine attends (engine.attention.attend)."""
    from flexrun.engine.attention import attend
    out = []
    for b, heads, t, hd in shapes:
        q = torch.randn(b, heads, 1, hd, device=device, dtype=dtype)
        k = torch.randn(b, heads, t, hd, device=device, dtype=dtype)
        v = torch.randn_like(k)
        mask = torch.ones(b, 1, 1, t, dtype=torch.bool, device=device)
        sec = best_time(lambda: attend(q, k, v, mask), sync=sync)
        out.append(2 * k.numel() * k.element_size() / sec)
    return statistics.median(out)


def qattn_bw(device: torch.device, dtype: torch.dtype, nbytes: int, sync=lambda: None,
             shape=(8, 32, 512, 128)) -> float:
    """Dense-equivalent KV bytes/s of a decode step's attention over a compressed cache
    (Policy's default 4-bit scheme) on `device`, as the engine runs it (attend_stored): the
    fused kernel on a GPU, else CompressedKVSlot.read dequantizes the slot, then attend.
    `shape` gets enough rows that its dense K and V exceed nbytes."""
    from flexrun.config import Policy
    from flexrun.engine.attention import attend_stored
    from flexrun.engine.kvcache import KVSlot
    from flexrun.engine.kvquant import CompressedKVSlot
    p = Policy()
    b, h, t, d = dram_shapes((shape,), nbytes, dtype.itemsize)[0]

    def make(shape_, dtype_, part=""):
        return KVSlot("gpu", False, shape_, dtype_, device, None, f"profile.{part}", None,
                      None, None, part, False)
    slot = CompressedKVSlot(make, (b, h, t, d), dtype, p.quant_bits, p.cache_group,
                            p.cache_scheme, p.cache_window, p.cache_sink)
    try:
        kv = [torch.randn(b, h, t, d, dtype=dtype, device=device) for _ in range(2)]
        slot.write(*kv, 0, torch.zeros(b, dtype=torch.long, device=device))   # as a prefill
        del kv
        q = torch.randn(b, h, 1, d, dtype=dtype, device=device)
        keys = (torch.zeros(b, dtype=torch.long, device=device),
                torch.full((1,), t - 1, dtype=torch.long, device=device))
        mask = torch.ones(b, 1, 1, t, dtype=torch.bool, device=device)
        sec = best_time(lambda: attend_stored(q, slot, t, keys, lambda: mask), reps=3,
                        sync=sync)
    finally:
        slot.close()
    return 2 * b * h * t * d * dtype.itemsize / sec


def h2d_pieces_s(dev: torch.device, sync, total: int, piece: int) -> float:
    """Seconds to copy `total` pinned host bytes to the device as copies of `piece` bytes
    issued back to back from Python, as the engine issues them."""
    src = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device=dev)
    pieces = [(dst[i:i + piece], src[i:i + piece]) for i in range(0, total, piece)]

    def run() -> None:
        for d, s in pieces:
            d.copy_(s, non_blocking=True)
    return best_time(run, reps=5, sync=sync)


def h2d_call_cost(dev: torch.device, sync, total: int = 256 << 20, piece: int = 1 << 20
                  ) -> float:
    """Seconds each pinned host->GPU copy costs beyond its bytes: `total` bytes in copies of
    `piece` bytes against one copy of them all (a Qwen3-MoE expert's tensors are 3 MiB)."""
    many, one = h2d_pieces_s(dev, sync, total, piece), h2d_pieces_s(dev, sync, total, total)
    return max(0.0, (many - one) / (total // piece - 1))


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
    solo = best_time(attn)
    th = threading.Thread(target=pump, daemon=True)
    th.start()
    try:
        while not copies and th.is_alive():     # time only once the copies are flowing
            time.sleep(1e-3)
        shared = best_time(attn)
    finally:
        stop.set()
        th.join()
    return solo, shared, len(copies) * copy_bytes / max(sum(copies), 1e-9)


def attn_bw_with_h2d(dev: torch.device, alone: float | None,
                      shape=(8, 32, 512, 128)) -> float | None:
    """cpu_attn_bw while host->GPU copies stream (the copy engine keeps its rate): measured
    at one shape (give one larger than the last-level cache: dram_shapes) and scaled to
    `alone` (the median over the shapes of cpu_attn_bw)."""
    b, heads, t, hd = shape
    q = torch.randn(b, heads, 1, hd, dtype=torch.float16)
    k, v = (torch.randn(b, heads, t, hd, dtype=torch.float16) for _ in range(2))
    solo, shared, _ = attention_beside_h2d(dev, lambda: F.scaled_dot_product_attention(q, k, v))
    return None if alone is None else alone * solo / shared


def unit_overhead(device: torch.device, dtype: torch.dtype, sync,
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
        return best_time(layer, sync=sync, min_s=20e-3)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        layer()                         # warm-up off the capture (lazy inits)
    torch.cuda.current_stream(device).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        layer()
    return best_time(g.replay, sync=sync, min_s=20e-3)


def expert_bw(dtype: torch.dtype, rows: int = 8, hidden: int = 4096, ffn: int = 4096) -> float:
    """Weight bytes/s a CPU expert (gate+up GEMM, SiLU product, down GEMM) reads over `rows`
    tokens: the rate of the MoE CPU lane (engine/experts.py), whose GEMMs are few-row and
    weight-bound. The run's dtype: fp16 for a GPU run's host experts."""
    gu, down = torch.randn(2 * ffn, hidden).to(dtype), torch.randn(hidden, ffn).to(dtype)
    x = torch.randn(rows, hidden).to(dtype)

    def run():
        g, u = (x @ gu.T).chunk(2, -1)
        return (F.silu(g) * u) @ down.T
    return (gu.numel() + down.numel()) * gu.element_size() / best_time(run, reps=3)


def grouped_expert_bw(device: torch.device, sync, experts: int = 128, hidden: int = 2048,
                      ffn: int = 768, rows_each: int = 4) -> float:
    """Weight bytes/s of a MoE layer's two grouped GEMMs (models/moe_grouped.grouped_mlp, the
    kernel a run picks) over every expert with `rows_each` rows: a decode call of staged or
    resident experts reads each expert's weights once for a few rows (Qwen3-30B-A3B's shape,
    64 rows x top-8 over 128 experts)."""
    from flexrun.models.moe_grouped import grouped_mlp
    dt = torch.float16
    w1 = torch.randn(experts, 2 * ffn, hidden, device=device, dtype=dt) * 0.02
    w2 = torch.randn(experts, hidden, ffn, device=device, dtype=dt) * 0.02
    xs = torch.randn(experts * rows_each, hidden, device=device, dtype=dt)
    offs = torch.arange(1, experts + 1, device=device, dtype=torch.int32) * rows_each
    t = best_time(lambda: grouped_mlp(xs, w1, w2, offs), sync=sync)
    return (w1.numel() + w2.numel()) * w1.element_size() / t


def copy_bw(src: torch.Tensor, dst: torch.Tensor, sync) -> float:
    return src.numel() * src.element_size() / best_time(lambda: dst.copy_(src), sync=sync)


def read_bw(sync, nbytes: int = 256 << 20) -> float:
    """Host bytes/s read by a reduction over nbytes (the faster of fp32 and bf16 sums: on
    few cores the fp32 sum is compute-bound), the rate weights and KV are read at by CPU
    compute; a memcpy moves each byte twice."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    rates = []
    for dtype in (torch.float32, torch.bfloat16):
        x = buf.view(dtype).normal_()
        rates.append(nbytes / best_time(lambda: x.sum(), sync=sync))
    return max(rates)


def disk_rates(offload_dir: str, size: int, chunk: int = 64 << 20) -> dict[str, float]:
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
        """As a CPU run's disk weights are read (disk.DiskTier.map_read)."""
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            mm, populated = map_pages(f)
        if not populated:               # older kernels: the pages fault in on first use
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


def cpu_has_bf16() -> bool:
    """Whether the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def w4_rates(device: torch.device) -> tuple[float, float] | None:
    """(bytes/s, FLOP/s) of the fused matmul: time = packed bytes / bw + 2 params rows / flops,
    solved from 32 and 128 rows at a 28672 x 8192 weight; None without Triton."""
    if not dequant.enabled() or device.type != "cuda":
        return None
    c = compress(torch.randn(28672, 8192, device=device, dtype=torch.float16), 4, 64, -1)
    times = {}
    for rows in (32, 128):
        x = torch.randn(rows, 8192, device=device, dtype=torch.float16)
        times[rows] = best_time(lambda: dequant.linear4(x, c),
                                sync=lambda: torch.cuda.synchronize(device))
    per_row = (times[128] - times[32]) / 96
    fixed = times[32] - 32 * per_row
    if per_row <= 0 or fixed <= 0:      # the two tile shapes did not fit one line
        return None
    return c.nbytes / fixed, 2 * 28672 * 8192 / per_row


def w4_expert_call(device: torch.device, rows: int = 8) -> float | None:
    """Seconds of one routed 4-bit expert over `rows` tokens on the per-expert route
    (models/moe.weighted_expert: the gather, the fused 4-bit gate, up and down, the
    activation, the routing weight) at a small shape, where its launches, not its bytes, set
    the time: after such a call's host sync on the routing counts the GPU waits for them
    (S6q's H100 trace: ~3.1 ms per call of 8 experts). None on CUDA without Triton."""
    from flexrun.models.moe import ExpertGroup, weighted_expert
    if device.type == "cuda" and not dequant.enabled():
        return None
    h, f = 1024, 2048
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    w = {f"experts.0.{p}.weight": compress(torch.randn(*shape, device=device, dtype=dtype),
                                           4, 64, -1)
         for p, shape in (("gate", (f, h)), ("up", (f, h)), ("down", (h, f)))}
    x = torch.randn(4 * rows, h, device=device, dtype=dtype)
    g = ExpertGroup(0, torch.arange(0, 4 * rows, 4, device=device),
                    torch.rand(rows, device=device, dtype=dtype), rows)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else lambda: None
    return best_time(lambda: weighted_expert(x, w, g), sync=sync)
