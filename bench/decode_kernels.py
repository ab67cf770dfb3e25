"""Time one decoder layer's decode-step kernels at a scenario's shapes (GPU machine).

python -m bench.decode_kernels OUT.json [--hidden 4096 --heads 32 --ffn 16384 --batch 32
                                          --len 528 --slot 544]
Prints and writes the time of each GEMM (separate and fused q/k/v), of attention as the eager
step runs it (flash, no mask, the used keys only) and as the static step can (SDPA over the
whole slot with a mask; the Triton split-K kernel over the keys in range), and of one whole
layer, each launched eagerly and replayed from a CUDA graph, with the HBM bytes each must
move, so the decode step's distance from its floor can be split by kernel.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from flexrun.engine.attention import attend, attend_range, attend_slot
from flexrun.engine.graphs import StepInputs, static_layer
from flexrun.plan.timing import best_time
from flexrun.models.opt import OPTModel
from flexrun.models.spec import ModelSpec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--len", type=int, default=528, help="keys in use (mid-generation)")
    ap.add_argument("--slot", type=int, default=544, help="slot length (prompt + gen)")
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.float16
    H, nh, F_, b, T, S = a.hidden, a.heads, a.ffn, a.batch, a.len, a.slot
    hd = H // nh
    sync = torch.cuda.synchronize
    res: dict = {"shape": vars(a)}

    def rec(name, fn, nbytes):
        """Time fn as launched eagerly and as replayed from a graph of 10 calls (no launch
        overhead: what a captured decode step pays)."""
        t = best_time(fn, sync=sync)
        fn()
        g, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
            g.capture_begin()
            for _ in range(10):
                fn()
            g.capture_end()
        torch.cuda.current_stream().wait_stream(s)
        tg = best_time(g.replay, sync=sync) / 10
        res[name] = {"us": t * 1e6, "GBps": nbytes / t / 1e9, "graph_us": tg * 1e6,
                     "graph_GBps": nbytes / tg / 1e9}
        print(f"{name:28s} {t * 1e6:8.1f} us {nbytes / t / 1e9:6.0f} GB/s   in a graph "
              f"{tg * 1e6:8.1f} us {nbytes / tg / 1e9:6.0f} GB/s", flush=True)

    x = torch.randn(b, 1, H, device=dev, dtype=dt)
    for name, n, k in (("gemm_q", H, H), ("gemm_qkv_fused", 3 * H, H), ("gemm_fc1", F_, H),
                       ("gemm_fc2", H, F_)):
        w = torch.randn(n, k, device=dev, dtype=dt) * 0.01
        bias = torch.zeros(n, device=dev, dtype=dt)
        inp = x if k == H else torch.randn(b, 1, k, device=dev, dtype=dt)
        rec(name, lambda: F.linear(inp, w, bias), n * k * 2)
    q = torch.randn(b, nh, 1, hd, device=dev, dtype=dt)
    K, V = (torch.randn(b, nh, S, hd, device=dev, dtype=dt) for _ in range(2))
    kv_bytes = 2 * b * nh * T * hd * 2
    rec("attn_flash_used_keys", lambda: attend(q, K[:, :, :T], V[:, :, :T], None), kv_bytes)
    mask = torch.zeros(b, 1, 1, S, dtype=torch.bool, device=dev)
    mask[..., :T] = True
    rec("attn_static_masked_slot", lambda: attend_slot(q, K, V, mask), kv_bytes * S / T)
    rec("attn_masked_used_keys", lambda: attend(q, K[:, :, :T], V[:, :, :T], mask[..., :T]),
        kv_bytes)
    start = torch.zeros(b, dtype=torch.long, device=dev)
    last = torch.tensor([T - 1], device=dev)
    rec("attn_range_triton", lambda: attend_range(q, K, V, start, last), kv_bytes)

    spec = ModelSpec(arch="opt", vocab_size=50272, hidden_size=H, num_layers=1, num_heads=nh,
                     num_kv_heads=nh, head_dim=hd, ffn_dim=F_, max_positions=2048)
    model = OPTModel(spec)
    shapes = {"q.weight": (H, H), "k.weight": (H, H), "v.weight": (H, H), "o.weight": (H, H),
              "fc1.weight": (F_, H), "fc2.weight": (H, F_)}
    wts = {n: torch.randn(s, device=dev, dtype=dt) * 0.01 for n, s in shapes.items()}
    for n in ("q", "k", "v", "o"):
        wts[f"{n}.bias"] = torch.zeros(H, device=dev, dtype=dt)
    wts["fc1.bias"] = torch.zeros(F_, device=dev, dtype=dt)
    wts["fc2.bias"] = torch.zeros(H, device=dev, dtype=dt)
    for n in ("attn_norm", "mlp_norm"):
        wts[f"{n}.weight"] = torch.ones(H, device=dev, dtype=dt)
        wts[f"{n}.bias"] = torch.zeros(H, device=dev, dtype=dt)
    steps = StepInputs(torch.zeros(b, 1, dtype=torch.long, device=dev),
                       torch.full((b, 1), T - 1, device=dev, dtype=torch.long), last, start)
    pos = steps.pos
    layer_bytes = sum(w.numel() * 2 for w in wts.values()) + kv_bytes

    def eager():
        qq, kk, vv = (y.transpose(1, 2) for y in model.pre_attn(wts, x, pos))
        K[:, :, T - 1:T].copy_(kk)
        V[:, :, T - 1:T].copy_(vv)
        return model.post_attn(wts, x, attend(qq, K[:, :, :T], V[:, :, :T], None))

    def static():
        return static_layer(model, wts, x, steps, K, V)
    rec("layer_eager", eager, layer_bytes)
    rec("layer_static", static, layer_bytes)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
