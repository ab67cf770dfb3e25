"""Which code took a CUDA run's memory: the caching allocator's history replayed.

`start()` turns on torch's allocation history (Python stacks); `report()` replays it and
prints (1) the live allocations at the allocated peak and (2) the allocations that made the
allocator reserve new segments (what `max_memory_reserved` counts), each grouped by the
flexrun source line that asked, largest first. bench.run_flexrun calls both around its
warm-up when FLEXRUN_BENCH_MEMTRACE names an output file.
"""
from __future__ import annotations

from collections import defaultdict

import torch

MAX_ENTRIES = 2_000_000


def start() -> None:
    torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES, stacks="python")


def _where(frames: list[dict], depth: int = 2) -> str:
    """The innermost `depth` flexrun frames of a stack, as file:line function."""
    own = [f for f in frames if "flexrun/" in f.get("filename", "")][:depth]
    if not own:
        own = frames[:1]
    return " < ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}"
                      for f in own) or "?"


def _grouped(entries, top: int) -> list[str]:
    sums: dict[str, list] = defaultdict(lambda: [0, 0])
    for e in entries:
        s = sums[_where(e.get("frames", []))]
        s[0] += e["size"]
        s[1] += 1
    rows = sorted(sums.items(), key=lambda kv: -kv[1][0])[:top]
    return [f"  {b / 2**30:8.3f} GiB in {n:6d}  {w}" for w, (b, n) in rows]


def _replay(live: dict[int, dict], e: dict) -> int:
    """Apply one trace entry to the live allocations (address -> entry); the bytes it adds.
    Frees of blocks allocated before the recorded window are not in `live` and count 0."""
    if e["action"] == "alloc":
        live[e["addr"]] = e
        return e["size"]
    if e["action"] == "free_completed" and live.pop(e["addr"], None) is not None:
        return -e["size"]
    return 0


def summarize(trace: list[dict], top: int = 12) -> list[str]:
    """Report lines from one device's trace entries (torch.cuda.memory._snapshot()'s
    device_traces[i])."""
    cur = peak = peak_at = 0
    live: dict[int, dict] = {}
    for i, e in enumerate(trace):
        cur += _replay(live, e)
        if cur > peak:
            peak, peak_at = cur, i
    live = {}
    for e in trace[:peak_at + 1]:
        _replay(live, e)
    # expandable segments (flexrun's allocator default) map pages instead of new segments
    grown = [e for e in trace if e["action"] in ("segment_alloc", "segment_map")]
    freed = sum(e["size"] for e in trace if e["action"] in ("segment_free", "segment_unmap"))
    grown_by_stream: dict[int, int] = defaultdict(int)
    for e in grown:
        grown_by_stream[e.get("stream", 0)] += e["size"]
    streams = ", ".join(f"stream {k}: {v / 2**30:.3f} GiB" for k, v in
                        sorted(grown_by_stream.items(), key=lambda kv: -kv[1]))
    return ([f"allocated peak in the recorded window: {peak / 2**30:.3f} GiB "
             f"(entry {peak_at} of {len(trace)}); live there, by source:"]
            + _grouped(live.values(), top)
            + [f"memory reserved in the window: {sum(e['size'] for e in grown) / 2**30:.3f} "
               f"GiB in {len(grown)} ({freed / 2**30:.3f} GiB released; {streams or '-'}); "
               "asked for by:"]
            + _grouped(grown, top))


def stream_pools(segments: list[dict], device: int) -> dict[int, list[int]]:
    """Reserved bytes, allocated bytes and segments per CUDA stream of `device`, from
    torch.cuda.memory_snapshot()'s segments: each stream has its own pool (and expandable
    segment), so one stream's cached memory cannot serve another's allocations and
    max_memory_reserved sums the pools' peaks."""
    pools: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
    for s in segments:
        if s.get("device", 0) == device:
            p = pools[s.get("stream", 0)]
            p[0] += s.get("total_size", 0)
            p[1] += s.get("allocated_size", 0)
            p[2] += 1
    return dict(pools)


def by_stream(segments: list[dict], device: int) -> list[str]:
    """Reserved and allocated bytes per CUDA stream at the end of the window (stream_pools)."""
    pools = stream_pools(segments, device)
    return [f"reserved at the end, by stream: {len(pools)} stream(s)"] + [
        f"  stream {k:#x}: reserved {r / 2**30:.3f} GiB, allocated {a / 2**30:.3f} GiB "
        f"in {n} segment(s)" for k, (r, a, n) in sorted(pools.items(), key=lambda kv: -kv[1][0])]


def report(path: str) -> None:
    """Write the summary of every device's recorded history to `path` and stop recording."""
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    lines = []
    for dev, trace in enumerate(snap.get("device_traces", [])):
        if trace:
            lines += [f"device {dev}:"] + summarize(trace)
        lines += by_stream(snap.get("segments", []), dev)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
