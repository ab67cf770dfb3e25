"""Pinned host->GPU copies issued back to back from Python, by piece size: the rate each size
reaches and the fixed cost per copy (the profile's h2d_call_s, fitted at 1 MB pieces), with
the piece sizes MoE experts cross as (Qwen3-30B-A3B: 3 MiB tensors; Mixtral-8x7B: 112 MiB
tensors in 16 MiB pieces).

python -m bench.copy_probe OUT.json    (CUDA)
"""
from __future__ import annotations

import json
import sys

import torch

from flexrun.plan.timing import h2d_call_cost, h2d_pieces_s

MB = 1 << 20
TOTAL = 384 * MB


def rate(piece: int, dev: torch.device) -> float:
    """Bytes/s of TOTAL bytes copied as back-to-back copies of `piece` bytes."""
    return TOTAL / h2d_pieces_s(dev, torch.cuda.synchronize, TOTAL, piece)


def main() -> None:
    dev = torch.device("cuda")
    sizes = {"1 MiB": MB, "3 MiB (a Qwen3-MoE expert tensor)": 3 * MB,
             "16 MiB (H2D_CHUNK)": 16 * MB, "384 MiB (one copy)": TOTAL}
    out = {"device": torch.cuda.get_device_name(dev),
           "rates_GBps": {k: rate(v, dev) / 1e9 for k, v in sizes.items()},
           "h2d_call_s": h2d_call_cost(dev, torch.cuda.synchronize)}
    for k, v in out["rates_GBps"].items():
        print(f"{k:36} {v:7.2f} GB/s")
    print(f"fixed cost per copy (h2d_call_s): {out['h2d_call_s'] * 1e6:.1f} us")
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
