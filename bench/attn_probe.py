"""Tile choices of the split-K decode attention (attn_triton) at S3's and S5's shapes.

python -m bench.attn_probe OUT  (CUDA) -> OUT/attn_probe.json and lines on stdout
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from flexrun.kernels import attention as at
from flexrun.plan.timing import best_time

SHAPES = {"S3 opt-6.7b b32": (32, 32, 32, 128), "S5 llama-70b b128": (128, 64, 8, 128)}
VARIANTS = [(bn, tp, nw) for bn in (32, 64, 128) for tp in (1024, 2048, 4096, 8192)
            for nw in (2, 4, 8)]


def main() -> None:
    out = Path(sys.argv[1])
    dev, res = torch.device("cuda"), []
    T, last = 544, 527
    for name, (b, nh, kvh, hd) in SHAPES.items():
        q = torch.randn(b, nh, 1, hd, device=dev, dtype=torch.float16)
        K = torch.randn(b, kvh, T, hd, device=dev, dtype=torch.float16)
        V = torch.randn_like(K)
        start = torch.randint(0, 16, (b,), device=dev)
        lt = torch.full((1,), last, device=dev)
        ref = at.decode_attention(q, K, V, start, lt)
        kv_bytes = 2 * b * kvh * (last + 1 - 8) * hd * 2
        for bn, tp, nw in VARIANTS:
            at.BLOCK_N, at.TARGET_PROGRAMS, at.NUM_WARPS = bn, tp, nw
            try:
                o = at.decode_attention(q, K, V, start, lt)
                us = best_time(lambda: at.decode_attention(q, K, V, start, lt),
                               sync=torch.cuda.synchronize) * 1e6
                rec = {"shape": name, "block_n": bn, "target": tp, "warps": nw, "us": us,
                       "TB_s": kv_bytes / us / 1e6,
                       "max_diff": (o.float() - ref.float()).abs().max().item()}
            except Exception as e:
                rec = {"shape": name, "block_n": bn, "target": tp, "warps": nw,
                       "error": str(e)[:200]}
            print(json.dumps(rec), flush=True)
            res.append(rec)
    (out / "attn_probe.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
