"""The fused 4-bit matmul (dequant_triton.linear4) against dequantize-then-cuBLAS, at decode
row counts and the weight shapes of OPT-30B and Llama-70B, for several tile configurations.

python -m bench.w4_probe OUT   (CUDA) -> OUT/w4_probe.json and a table on stdout
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from flexrun.kernels import dequant as dq
from flexrun.plan.timing import best_time
from flexrun.memory.quant import compress, decompress

SHAPES = {"opt30b.qkvo": (7168, 7168), "opt30b.fc1": (28672, 7168),
          "opt30b.fc2": (7168, 28672), "llama70b.kv": (1024, 8192),
          "llama70b.q": (8192, 8192), "llama70b.gate": (28672, 8192),
          "llama70b.down": (8192, 28672)}
CONFIGS = [(32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4), (64, 256, 4, 3),
           (128, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 5), (128, 256, 8, 3),
           (64, 256, 8, 4), (32, 512, 4, 3), (64, 128, 8, 3, 128), (128, 128, 8, 3, 128),
           (64, 256, 8, 3, 128), (128, 64, 8, 4, 128)]
# the weight-first kernel: (BLOCK_N, BLOCK_K, warps, stages); BLOCK_M follows the row count
T_CONFIGS = [dq.Tiles(*c, weight_first=True) for c in (
    (64, 64, 4, 4), (64, 128, 4, 3), (64, 256, 4, 3), (64, 256, 4, 4), (64, 512, 4, 3),
    (128, 128, 4, 3), (128, 128, 8, 4), (128, 256, 4, 3), (128, 256, 8, 3))]


def timed(fn) -> float:
    """Seconds per call, timed as the hardware profile times (fastest sample)."""
    return best_time(fn, sync=torch.cuda.synchronize)


def main() -> None:
    out = Path(sys.argv[1])
    rows_list = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "32").split(",")]
    names = sys.argv[3].split(",") if len(sys.argv) > 3 else list(SHAPES)
    dev = torch.device("cuda")
    res = []
    for name in names:
        n, k = SHAPES[name]
        w = (torch.randn(n, k, device=dev) * 0.02).half()
        c = compress(w, 4, 64, -1)
        for m in rows_list:
            x = torch.randn(m, k, device=dev).half()
            ref = F.linear(x.float(), decompress(c).float())
            base = timed(lambda: F.linear(x, decompress(c)))
            rec = {"shape": name, "n": n, "k": k, "rows": m, "dequant_cublas_ms": base * 1e3,
                   "bytes_4bit": c.nbytes}
            chosen = dq.w4_config(m, n, k)
            variants = [("chosen " + str(tuple(chosen)), chosen)]
            variants += [(str(cfg), cfg) for cfg in CONFIGS
                         if not ((m > dq.FUSED_MAX_ROWS and cfg != CONFIGS[0]) or
                                 (m <= 64 and len(cfg) > 4))]
            variants += [("t" + str(tuple(cfg)[:4]), cfg) for cfg in T_CONFIGS
                         if m <= dq.FUSED_MAX_ROWS]
            for key, cfg in variants:
                def fn(cfg=cfg):
                    return dq.linear4(x, c, None, cfg)
                try:
                    y = fn()
                    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                    s = timed(fn)
                    rec[key] = {"ms": s * 1e3, "GB_s": c.nbytes / s / 1e9, "rel_err": err}
                except Exception as e:          # a config the compiler rejects
                    rec[key] = {"error": str(e)[:200]}
            best = min((v["ms"], key) for key, v in rec.items()
                       if isinstance(v, dict) and "ms" in v)
            rec["best"] = best[1]
            print(json.dumps(rec), flush=True)
            res.append(rec)
    (out / "w4_probe.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
