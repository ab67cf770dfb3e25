"""Mixture-of-experts checks on a device: experts over tiers and lanes, grouped and 4-bit experts.

python -m bench.moe_check [--device cuda] [-o OUT.json]
1. Tiny random transformers checkpoints of each MoE family (tests/families.py), fp32: greedy
   tokens of a ragged batch with the experts split 30/40/30 over gpu/cpu/disk on each lane
   (copy, cpu, auto) against the resident run on the same device, and the resident run
   against transformers on the same device.
   Then in half precision with every expert staged (the staging slots, copies made ahead).
2. moe_mlp's grouped experts (one GEMM per touched expert over its tokens) and the grouped
   GEMMs over stacked experts (torch's kernel or the Triton one) against a plain per-token
   loop, in fp16, and 4-bit experts against the same experts decompressed; the 4-bit experts
   joined as a resident layer's run as grouped 4-bit GEMMs (kernels/grouped4.py) against
   their per-expert route.
Prints one line per check and writes them as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def tier_rows(device: str) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import ragged_prompts
    from families import build_model, save_family
    from flexrun import LLM, Policy, SamplingParams
    greedy = SamplingParams(ignore_eos=True)
    rows = []
    for fam in ("mixtral", "qwen2_moe", "qwen3_moe"):
        with tempfile.TemporaryDirectory() as tmp:
            d = save_family(fam, Path(tmp) / "m")
            prompts = ragged_prompts(4, seed=3)
            hf = build_model(fam).to(device).float().eval()
            hf.generation_config.eos_token_id = None    # every new token the argmax
            with LLM(str(d), device=device, dtype="float32", policy=Policy()) as llm:
                ref = [o.output_ids for o in llm.generate(prompts, 10, greedy)]
            hf_ids = []
            for p in prompts:
                with torch.no_grad():
                    out = hf.generate(torch.tensor([p], device=device), max_new_tokens=10,
                                      do_sample=False, pad_token_id=0)
                hf_ids.append(out[0, len(p):].tolist())
            row = {"family": fam, "resident_vs_transformers": hf_ids == ref}
            for lanes in ("copy", "cpu", "auto"):
                pol = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_gpu=30,
                             weights_cpu=40, weights_disk=30, expert_lanes=lanes)
                off = Path(tmp) / f"off-{lanes}"
                off.mkdir()
                with LLM(str(d), device=device, dtype="float32", policy=pol,
                         offload_dir=str(off)) as llm:
                    outs = [o.output_ids for o in llm.generate(prompts, 10, greedy)]
                    st = llm.pipeline.experts.stats
                row[f"tiers_{lanes}_same_tokens"] = outs == ref
                row[f"tiers_{lanes}_copied_cpu_runs"] = [st.copied, st.cpu_runs]
            row.update(staged_row(d, prompts, device, Path(tmp)))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def staged_row(d: Path, prompts, device: str, tmp: Path) -> dict:
    """Half precision (fp16 on CUDA), experts 30/70 over gpu/cpu on the copy lane, every
    expert staged per unit (STAGE_ALL 0): the staging slots, the next unit's copies made ahead
    and the grouped GEMM kernel of this device and dtype, against the resident run."""
    from flexrun import LLM, Policy, SamplingParams
    from flexrun.engine import experts as engine_experts
    from flexrun.models import moe
    greedy, dtype = SamplingParams(ignore_eos=True), "float16" if device == "cuda" else \
        "float32"
    old = moe.STAGE_ALL, engine_experts.GROUPED_ON_CPU
    moe.STAGE_ALL, engine_experts.GROUPED_ON_CPU = 0.0, True
    try:
        with LLM(str(d), device=device, dtype=dtype, policy=Policy()) as llm:
            ref = [o.output_ids for o in llm.generate(prompts, 10, greedy)]
        pol = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_gpu=30, weights_cpu=70,
                     expert_lanes="copy")
        trace = tmp / "staged.json"
        with LLM(str(d), device=device, dtype=dtype, policy=pol, trace=str(trace)) as llm:
            outs = [o.output_ids for o in llm.generate(prompts, 10, greedy)]
            staged = llm.pipeline.experts.staging is not None
    finally:
        moe.STAGE_ALL, engine_experts.GROUPED_ON_CPU = old
    ahead = sum(e.get("name", "").endswith(" ahead")
                for e in json.loads(trace.read_text())["traceEvents"])
    return {"staged_dtype": dtype, "staged_same_tokens": outs == ref, "staging": staged,
            "staged_copies_ahead": ahead}


def kernel_rows(device: str) -> list[dict]:
    from flexrun.memory.quant import compress, decompress
    from flexrun.models.moe import moe_mlp
    from flexrun.models.spec import ModelSpec
    rows = []
    for E, k, h, f in ((8, 2, 4096, 14336), (128, 8, 2048, 768)):
        spec = ModelSpec(arch="llama", family="mixtral", vocab_size=16, hidden_size=h,
                         num_layers=1, num_heads=32, num_kv_heads=8, head_dim=h // 32,
                         ffn_dim=f, max_positions=16, num_experts=E, experts_per_token=k,
                         expert_ffn_dim=f, router_kind="topk_softmax")
        g = torch.Generator(device=device).manual_seed(0)
        w = {"router.weight": torch.randn(E, h, generator=g, device=device).half() * 0.05}
        for e in range(E):
            for p, shp in (("gate", (f, h)), ("up", (f, h)), ("down", (h, f))):
                w[f"experts.{e}.{p}.weight"] = (torch.randn(shp, generator=g, device=device)
                                                * 0.02).half()
        x = torch.randn(256, h, generator=g, device=device).half()
        grouped = moe_mlp(x, w, spec)
        ref = torch.zeros_like(x, dtype=torch.float32)
        logits = (x @ w["router.weight"].T).float()
        top, idx = logits.topk(k, -1)
        p = torch.softmax(top, -1)
        for t in range(x.shape[0]):
            for j in range(k):
                e = int(idx[t, j])
                v = x[t:t + 1]
                gate, up = w[f"experts.{e}.gate.weight"], w[f"experts.{e}.up.weight"]
                y = F.silu(v @ gate.T) * (v @ up.T)
                ref[t] += p[t, j] * (y @ w[f"experts.{e}.down.weight"].T).float()[0]
        wq = {n: compress(t, 4, 64, dim=-1) if n.startswith("experts.") else t
              for n, t in w.items()}
        wd = {n: t if isinstance(t, torch.Tensor) else decompress(t) for n, t in wq.items()}
        q, dq = moe_mlp(x, wq, spec), moe_mlp(x, wd, spec)
        # the same 4-bit experts joined as a resident layer's are (TieredStore.join): the
        # grouped 4-bit GEMMs (kernels/grouped4.py) against the per-expert route above
        from flexrun.memory.quant import join_rows
        from flexrun.models.moe_grouped import stacked_experts
        wj = dict(wq)
        for names in ([f"experts.{e}.{p}.weight" for e in range(E) for p in ("gate", "up")],
                      [f"experts.{e}.down.weight" for e in range(E)]):
            wj.update(zip(names, join_rows([wq[n] for n in names])))
        q_grouped = moe_mlp(x, wj, spec)
        # the grouped GEMMs over the experts stacked back to back (a resident layer, the
        # staging slots): torch's kernel, or the Triton one where torch has none
        from flexrun.models import moe_grouped
        stacked = (torch.stack([torch.cat([w[f"experts.{e}.gate.weight"],
                                           w[f"experts.{e}.up.weight"]]) for e in range(E)]),
                   torch.stack([w[f"experts.{e}.down.weight"] for e in range(E)]))
        out = torch.zeros_like(x)
        weight, sel = torch.softmax(top, -1).to(x.dtype), idx
        counts = torch.zeros(E, dtype=torch.long, device=device).index_add_(
            0, sel.reshape(-1), torch.ones_like(sel.reshape(-1)))
        moe_grouped.grouped_experts(x, stacked, weight, sel, counts, out)
        kernel = "triton" if moe_grouped._triton_grouped(x, stacked[0]) else "torch"
        row = {"experts": E, "top_k": k, "hidden": h, "ffn": f, "tokens": x.shape[0],
               "grouped_vs_per_token_max_abs": float((grouped.float() - ref).abs().max()),
               "stacked_grouped_kernel": kernel,
               "stacked_grouped_vs_per_token_max_abs": float((out.float() - ref).abs().max()),
               "ref_max_abs": float(ref.abs().max()),
               "w4_vs_dequantized_max_abs": float((q.float() - dq.float()).abs().max()),
               "w4_grouped": stacked_experts(wj, E) is not None,
               "w4_grouped_vs_per_expert_max_abs": float((q_grouped.float() - q.float())
                                                         .abs().max()),
               "dequantized_max_abs": float(dq.float().abs().max())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("-o", "--out", default=None)
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
           "kernels": kernel_rows(a.device), "tiers": tier_rows(a.device)}
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
