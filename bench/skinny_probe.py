"""Decode-sized fp16 GEMMs (32 rows) in Triton against F.linear (cuBLAS), S3's shapes.

python -m bench.skinny_probe OUT  (CUDA) -> OUT/skinny_probe.json and lines on stdout
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flexrun.plan.timing import best_time


@triton.jit
def _mm(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WEIGHT_FIRST: tl.constexpr):
    """y = x W^T + b over one BLOCK_N slice of W; WEIGHT_FIRST computes y^T = W x^T."""
    pid_n = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M) if WEIGHT_FIRST else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=(rm < M)[:, None],
                    other=0.0)
        w = tl.load(w_ptr + rn[:, None] * K + (k0 + rk)[None, :], mask=(rn < N)[:, None],
                    other=0.0)
        if WEIGHT_FIRST:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    bias = tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    if WEIGHT_FIRST:
        tl.store(y_ptr + rm[None, :] * N + rn[:, None], (acc + bias[:, None]).to(tl.float16),
                 mask=(rm < M)[None, :] & (rn < N)[:, None])
    else:
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], (acc + bias[None, :]).to(tl.float16),
                 mask=(rm < M)[:, None] & (rn < N)[None, :])


SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "fc1": (16384, 4096), "fc2": (4096, 16384)}
CONFIGS = [(kind, bn, bk, nw, ns) for kind in ("x", "t") for bn, bk in
           ((32, 256), (64, 128), (64, 256), (32, 512), (128, 128))
           for nw, ns in ((4, 3), (4, 4), (8, 3))]


def main() -> None:
    out = Path(sys.argv[1])
    dev, res = torch.device("cuda"), []
    m = 32
    for name, (n, k) in SHAPES.items():
        x = torch.randn(m, k, device=dev, dtype=torch.float16)
        w = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        b = torch.randn(n, device=dev, dtype=torch.float16)
        ref = F.linear(x, w, b)
        base = best_time(lambda: F.linear(x, w, b), sync=torch.cuda.synchronize) * 1e6
        rec = {"shape": name, "cublas_us": base, "cublas_TB_s": w.nbytes / base / 1e6}
        for kind, bn, bk, nw, ns in CONFIGS:
            y = torch.empty(m, n, device=dev, dtype=torch.float16)
            def fn():
                _mm[(triton.cdiv(n, bn),)](x, w, b, y, m, n, K=k, BLOCK_M=m, BLOCK_N=bn,
                                           BLOCK_K=bk, WEIGHT_FIRST=kind == "t",
                                           num_warps=nw, num_stages=ns)
            try:
                fn()
                us = best_time(fn, sync=torch.cuda.synchronize) * 1e6
                rec[f"{kind}{(bn, bk, nw, ns)}"] = {
                    "us": us, "TB_s": w.nbytes / us / 1e6,
                    "max_diff": (y.float() - ref.float()).abs().max().item()}
            except Exception as e:
                rec[f"{kind}{(bn, bk, nw, ns)}"] = {"error": str(e)[:150]}
        best = sorted((v["us"], key) for key, v in rec.items() if isinstance(v, dict) and "us" in v)
        print(name, "cublas %.1f us (%.2f TB/s)" % (base, rec["cublas_TB_s"]),
              " | ".join("%s %.1f" % (key, us) for us, key in best[:4]), flush=True)
        res.append(rec)
    (out / "skinny_probe.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
