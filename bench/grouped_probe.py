"""The Triton grouped GEMM at MoE decode shapes: its fixed tiles against tuned ones.

python -m bench.grouped_probe [-o OUT.json]      (CUDA)
One decode MoE call's two grouped GEMMs (gate+up, down) for S7's Qwen3-30B-A3B (64 rows,
top-8 of 128 experts) and S6's Mixtral-8x7B (64 rows, top-2 of 8), uniform routing, fp16:
fixed = kernels.grouped.fixed_tiles (FLEXRUN_GROUPED_TUNE=0), tuned = triton.autotune's pick
(FLEXRUN_GROUPED_TUNE=1); milliseconds per call (CUDA events, median of 20 after the tuning
call), the touched experts' weight bytes over that time, the tuned configuration, and the
largest difference between the two results. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from flexrun.kernels import grouped

SHAPES = [  # name, rows, experts, top-k, hidden, expert intermediate
    ("qwen3-30b-a3b", 64, 128, 8, 2048, 768),
    ("mixtral-8x7b", 64, 8, 2, 4096, 14336)]


def _timed(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def probe(name: str, rows: int, E: int, k: int, hidden: int, inter: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    picks = torch.rand(rows, E, generator=g, device="cuda").topk(k, -1).indices.flatten()
    counts = torch.bincount(picks, minlength=E)
    ends = counts.cumsum(0).to(torch.int32)
    touched = int((counts > 0).sum())
    out = []
    for part, n, kk in (("gate+up", 2 * inter, hidden), ("down", hidden, inter)):
        x = torch.randn(rows * k, kk, device="cuda", dtype=torch.float16) * 0.1
        w = torch.randn(E, n, kk, device="cuda", dtype=torch.float16) * 0.02
        res, ms = {}, {}
        for mode in ("fixed", "tuned"):
            os.environ["FLEXRUN_GROUPED_TUNE"] = "1" if mode == "tuned" else "0"
            res[mode] = grouped.grouped_mm(x, w, ends)
            ms[mode] = _timed(lambda: grouped.grouped_mm(x, w, ends))
        os.environ.pop("FLEXRUN_GROUPED_TUNE")
        nbytes = touched * n * kk * 2
        best = getattr(grouped._grouped_tuned, "best_config", None)
        out.append({"model": name, "gemm": part, "rows": rows * k, "N": n, "K": kk,
                    "experts_touched": touched, "weight_bytes": nbytes,
                    "fixed_ms": ms["fixed"], "tuned_ms": ms["tuned"],
                    "fixed_TBps": nbytes / ms["fixed"] / 1e9,
                    "tuned_TBps": nbytes / ms["tuned"] / 1e9,
                    "tuned_config": str(best) if best is not None else None,
                    "max_abs_diff": float((res["fixed"] - res["tuned"]).abs().max())})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--out", default=None)
    a = ap.parse_args()
    rows = [r for shape in SHAPES for r in probe(*shape)]
    print(f"{'model':14} {'gemm':8} {'N x K':>12} {'fixed ms':>9} {'tuned ms':>9} "
          f"{'fixed TB/s':>10} {'tuned TB/s':>10}  config")
    for r in rows:
        print(f"{r['model']:14} {r['gemm']:8} {r['N']:>5} x {r['K']:<5} {r['fixed_ms']:9.3f} "
              f"{r['tuned_ms']:9.3f} {r['fixed_TBps']:10.2f} {r['tuned_TBps']:10.2f}  "
              f"{r['tuned_config']} (diff {r['max_abs_diff']:.4f})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
