"""Where a decode step's time goes, from a flexrun --trace (Chrome trace JSON).

python -m bench.overlap_report TRACE.json[.gz] [--json OUT.json]

Takes the last block in the trace (from its prefill on: the last block of the last generate
call) and, per decode step and
per unit, sums the compute spans (timed by CUDA events on the compute stream), the weight
copies (`h2d w<u>` on the weight stream) and the compute stream's idle time between units
(waiting for a copy, or for the host to issue work). A step near the sum of compute and
copies, rather than near the larger of the two, has lost its overlap.
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict

_COMPUTE = re.compile(r"s(\d+) u(\d+) b(\d+)$")
_STEP = re.compile(r"s(\d+) u(\d+) ")
_H2D = re.compile(r"h2d w(\d+)$")


def _load(path: str) -> list[dict]:
    """The trace's events (plain JSON, or gzipped as `bench.run --trace` keeps it)."""
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rt") as f:
        return json.load(f)["traceEvents"]


def _last_block(spans: list[tuple]) -> list[tuple]:
    """Sorted (start, end, step, unit, ...) spans from the last block's prefill on (the last
    `s0 u0` span)."""
    starts = [i for i, c in enumerate(spans) if c[2] == 0 and c[3] == 0]
    return spans[starts[-1]:] if starts else spans


def _spans(events: list[dict]) -> tuple[list[tuple], list[tuple]]:
    ev = [e for e in events if e.get("ph") == "X"]
    compute = []
    for e in ev:
        m = _COMPUTE.match(e["name"])
        if m:
            compute.append((e["ts"], e["ts"] + e["dur"], *map(int, m.groups())))
    compute = _last_block(sorted(compute))
    t0 = compute[0][0] if compute else 0.0
    copies = sorted((e["ts"], e["ts"] + e["dur"], int(_H2D.match(e["name"]).group(1)))
                    for e in ev if _H2D.match(e["name"]) and e["ts"] >= t0)
    return compute, copies


def report(path: str) -> dict:
    """Per-step and per-unit sums (ms) of the last block's decode steps."""
    events = _load(path)
    compute, copies = _spans(events)
    steps: dict[int, list] = defaultdict(list)
    for c in compute:
        if c[2] >= 1:
            steps[c[2]].append(c)
    rows, per_unit = [], defaultdict(lambda: [0.0, 0.0, 0])
    for s, cs in sorted(steps.items()):
        lo, hi = cs[0][0], max(c[1] for c in cs)
        busy = sum(c[1] - c[0] for c in cs)
        h2d = sum(b - a for a, b, _ in copies if lo <= a < hi)
        rows.append({"step": s, "wall_ms": (hi - lo) / 1e3, "compute_ms": busy / 1e3,
                     "h2d_ms": h2d / 1e3, "compute_idle_ms": (hi - lo - busy) / 1e3})
        prev_end = lo
        for c in cs:
            acc = per_unit[c[3]]
            acc[0] += (c[1] - c[0]) / 1e3
            acc[1] += max(0.0, c[0] - prev_end) / 1e3
            acc[2] += 1
            prev_end = c[1]
    copy_of = defaultdict(list)
    for a, b, u in copies:
        copy_of[u].append((b - a) / 1e3)
    units = {u: {"compute_ms": a[0] / a[2], "idle_before_ms": a[1] / a[2],
                 "h2d_ms": sum(copy_of[u]) / len(copy_of[u]) if copy_of[u] else 0.0}
             for u, a in sorted(per_unit.items())}
    return {"steps": rows, "units": units, "tracks": track_busy(path, events)}


def _union_ms(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Time within [lo, hi) covered by at least one span (overlapping spans count once)."""
    total, end = 0.0, lo
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in spans if b > lo and a < hi):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e3


def track_busy(path: str, events: list[dict] | None = None) -> list[dict]:
    """Per step of the last block (0: its prefill): its wall time and each track's busy time in it
    (expert copies, CPU attention, CPU experts, compute...): a step near the sum of two
    tracks' times rather than the larger one runs them one after the other (events: the
    trace's, when already read)."""
    events = _load(path) if events is None else events
    ev = [e for e in events if e.get("ph") == "X"]
    marks = _last_block(sorted((e["ts"], e["ts"] + e["dur"], *map(int, m.groups()))
                               for e in ev if (m := _STEP.match(e["name"] + " "))))
    windows: dict[int, list[float]] = {}
    for a, b, step, _ in marks:
        w = windows.setdefault(step, [a, b])
        w[0], w[1] = min(w[0], a), max(w[1], b)
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M"}
    by_track: dict[str, list] = defaultdict(list)
    for e in ev:
        by_track[names.get(e["tid"], str(e["tid"]))].append((e["ts"], e["ts"] + e["dur"]))
    rows = []
    for step, (lo, hi) in sorted(windows.items()):
        rows.append({"step": step, "wall_ms": (hi - lo) / 1e3,
                     **{t: round(_union_ms(sp, lo, hi), 2) for t, sp in sorted(by_track.items())}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    r = report(a.trace)
    print(f"{'step':>4} {'wall ms':>9} {'compute':>9} {'h2d':>9} {'idle':>9}")
    for s in r["steps"]:
        print(f"{s['step']:>4} {s['wall_ms']:>9.2f} {s['compute_ms']:>9.2f} {s['h2d_ms']:>9.2f} "
              f"{s['compute_idle_ms']:>9.2f}")
    print(f"{'unit':>4} {'compute':>9} {'idle before':>12} {'h2d':>9}")
    for u, x in r["units"].items():
        print(f"{u:>4} {x['compute_ms']:>9.3f} {x['idle_before_ms']:>12.3f} {x['h2d_ms']:>9.3f}")
    for row in r["tracks"]:
        print("  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in row.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
