"""Time the non-GEMM parts of a GPU prefill layer in variants (S3's shapes: OPT-6.7B, 32 x 512).

python -m bench.prefill_probe OUT  (CUDA) -> OUT/prefill_probe.json and lines on stdout

A torch.profiler trace of S3's prefill (bench.profile_step) spent 288 of 344 ms in the GEMMs;
the rest is attention (13.5 ms), the KV slot writes (13.7 ms, a strided fp16 copy), ReLU
(11.3 ms), residual adds (8.3 ms) and layer norms (8.0 ms). Each variant here is checked
against the plain op for equal output.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flexrun.plan.timing import best_time


def timed(fn) -> float:
    return best_time(fn, sync=torch.cuda.synchronize) * 1e3


def main() -> None:
    out = Path(sys.argv[1])
    b, s, h, d, ffn = 32, 512, 32, 128, 16384
    dev, dt = torch.device("cuda"), torch.float16
    res: dict = {}
    qkv = torch.randn(b, s, 3 * h * d, device=dev, dtype=dt)
    q, k, v = (t.view(b, s, h, d).transpose(1, 2) for t in qkv.split(h * d, -1))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            res[f"sdpa_{name}"] = {"ms": ms, "max_diff": (o - ref).abs().max().item()}
        except Exception as e:
            res[f"sdpa_{name}"] = {"error": str(e)[:200]}
        print(name, res[f"sdpa_{name}"], flush=True)

    x = torch.randn(b * s, h * d, device=dev, dtype=dt)
    w = torch.randn(ffn, h * d, device=dev, dtype=dt) * 0.02
    bias = torch.randn(ffn, device=dev, dtype=dt) * 0.1
    for rows in (b * s, b):
        xr = x[:rows]
        plain = torch.relu_(F.linear(xr, w, bias))
        fused = torch._addmm_activation(bias, xr, w.t())
        res[f"fc1_relu_{rows}"] = {
            "plain_ms": timed(lambda: torch.relu_(F.linear(xr, w, bias))),
            "linear_only_ms": timed(lambda: F.linear(xr, w, bias)),
            "addmm_relu_ms": timed(lambda: torch._addmm_activation(bias, xr, w.t())),
            "equal": torch.equal(plain, fused)}
        print(rows, res[f"fc1_relu_{rows}"], flush=True)

    slot = torch.zeros(b, h, s + 32, d, device=dev, dtype=dt)
    slot2 = torch.zeros_like(slot)

    def wide(t):
        return t.view(torch.int64)
    res["kv_write"] = {
        "fp16_ms": timed(lambda: slot[:, :, :s].copy_(k)),
        "int64_view_ms": timed(lambda: wide(slot2[:, :, :s]).copy_(wide(k))),
    }
    res["kv_write"]["equal"] = torch.equal(slot, slot2)
    print(res["kv_write"], flush=True)
    hres = torch.randn(b, s, h * d, device=dev, dtype=dt)
    y = torch.randn_like(hres)
    res["add_ms"] = timed(lambda: hres + y)
    res["layer_norm_ms"] = timed(lambda: F.layer_norm(hres, (h * d,), w[0, :h * d], bias[:h * d]))
    print(res, flush=True)
    (out / "prefill_probe.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
