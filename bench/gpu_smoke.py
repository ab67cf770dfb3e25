"""GPU smoke run: CUDA correctness vs CPU and vs resident, CPU-attention kernels, S3 speed.

python -m bench.gpu_smoke OUT_DIR   (on the GPU machine)
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import ragged_prompts, tiny_llama, tiny_opt  # noqa: E402
from flexrun import LLM, Policy, SamplingParams  # noqa: E402

GREEDY = SamplingParams(ignore_eos=True)


def agreement(a, b) -> float:
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))
    return same / max(sum(len(p) for p in a), 1)


def tiny_checks(tmp: Path, out: dict, only: str | None = None) -> None:
    prompts = ragged_prompts(8)
    for name, make in (("opt", tiny_opt), ("opt350", lambda p: tiny_opt(p, post_ln=True)),
                       ("llama", tiny_llama)):
        if only and name != only:
            continue
        d = make(tmp / name)
        with LLM(str(d), device="cpu") as llm:
            cpu = [o.output_ids for o in llm.generate(prompts, 16, GREEDY)]
        with LLM(str(d), device="cuda") as llm:
            res = [o.output_ids for o in llm.generate(prompts, 16, GREEDY)]
        row = {"cuda_fp16_vs_cpu_fp32": agreement(res, cpu)}
        # a stop id the run generates: each output must be the full run's, cut after it
        # (the host reads a step's ids one step late: Pipeline._defer)
        stop = res[0][3]
        want = [o[:o.index(stop) + 1] if stop in o else o for o in res]
        with LLM(str(d), device="cuda") as llm:
            got = [o.output_ids for o in llm.generate(
                prompts, 16, SamplingParams(ignore_eos=True, stop_token_ids=[stop]))]
        row["stop_ids_vs_cut"] = float(got == want)
        variants = {
            "w_cpu": Policy(weights_gpu=0, weights_cpu=100, gpu_batch_size=3, num_gpu_batches=2),
            "w_disk_c_cpu": Policy(weights_gpu=0, weights_disk=100, cache_gpu=0, cache_cpu=100,
                                   gpu_batch_size=4, num_gpu_batches=2),
            "c_cpu_cpuattn": Policy(weights_gpu=20, weights_cpu=80, cache_gpu=0, cache_cpu=100,
                                    act_gpu=0, act_cpu=100, cpu_attention=True,
                                    gpu_batch_size=2, num_gpu_batches=3),
            "act_cpu_gpu_attn": Policy(weights_gpu=50, weights_cpu=50, act_gpu=0, act_cpu=100,
                                       gpu_batch_size=3, num_gpu_batches=3),
            "split_no_overlap": Policy(weights_gpu=30, weights_cpu=40, weights_disk=30,
                                       cache_gpu=30, cache_cpu=40, cache_disk=30, overlap=False,
                                       gpu_batch_size=4, num_gpu_batches=2),
        }
        for vname, pol in variants.items():
            with LLM(str(d), device="cuda", policy=pol, offload_dir=str(tmp)) as llm:
                got = [o.output_ids for o in llm.generate(prompts, 16, GREEDY)]
            row[vname] = agreement(got, res)
        row.update(extra_checks(d, prompts, res, tmp))
        out.setdefault("tiny", {})[name] = row
        print(name, row, flush=True)


def extra_checks(d: Path, prompts, resident, tmp: Path) -> dict:
    """Chunked weight copies (tiny chunks) and the fused dequant kernel vs the plain one."""
    import os

    from flexrun.memory import pinned
    row = {}
    saved, pinned.H2D_CHUNK = pinned.H2D_CHUNK, 4096
    try:
        pol = Policy(weights_gpu=0, weights_cpu=100, cache_gpu=0, cache_cpu=100,
                     cpu_attention=True, gpu_batch_size=4, num_gpu_batches=2)
        with LLM(str(d), device="cuda", policy=pol, offload_dir=str(tmp)) as llm:
            got = [o.output_ids for o in llm.generate(prompts, 16, GREEDY)]
        row["w_cpu_chunked_h2d"] = agreement(got, resident)
        pol.act_gpu, pol.act_cpu = 0, 100       # pinned activation buffers, reused
        with LLM(str(d), device="cuda", policy=pol, offload_dir=str(tmp)) as llm:
            got = [o.output_ids for o in llm.generate(prompts, 16, GREEDY)]
            got2 = [o.output_ids for o in llm.generate(prompts[:5], 16, GREEDY)]
        row["w_cpu_chunked_h2d_act_cpu"] = agreement(got, resident)
        row["act_cpu_second_block"] = agreement(got2, resident[:5])
    finally:
        pinned.H2D_CHUNK = saved
    outs = {}
    for plain in ("1", "0"):
        os.environ["FLEXRUN_PLAIN_DEQUANT"] = plain
        with LLM(str(d), device="cuda", compress_weight=True, compress_cache=True) as llm:
            outs[plain] = [o.output_ids for o in llm.generate(prompts, 16, GREEDY)]
    os.environ["FLEXRUN_W4_KERNEL"] = "weight-first"     # tiny weights take x-first
    with LLM(str(d), device="cuda", compress_weight=True, compress_cache=True) as llm:
        outs["t"] = [o.output_ids for o in llm.generate(prompts, 16, GREEDY)]
    os.environ.pop("FLEXRUN_PLAIN_DEQUANT")
    os.environ.pop("FLEXRUN_W4_KERNEL")
    row["compressed_fused_vs_plain"] = agreement(outs["0"], outs["1"])
    row["compressed_weight_first_vs_plain"] = agreement(outs["t"], outs["1"])
    row.update(cudnn_checks(d, prompts))
    row.update(graph_checks(d, prompts, tmp))
    return row


def cudnn_checks(d: Path, prompts) -> dict:
    """Unpadded prompts (a causal prefill with no mask takes cuDNN's attention) against the
    same run with SDPA's own kernel order, and against the CPU run."""
    from flexrun.engine import attention
    same = [p[:5] for p in prompts if len(p) >= 5]
    outs = {}
    for first in (True, False):
        attention._CUDNN_FIRST = first
        with LLM(str(d), device="cuda") as llm:
            outs[first] = [o.output_ids for o in llm.generate(same, 16, GREEDY)]
    attention._CUDNN_FIRST = True
    with LLM(str(d), device="cpu") as llm:
        cpu = [o.output_ids for o in llm.generate(same, 16, GREEDY)]
    return {"unpadded_cudnn_vs_flash": agreement(outs[True], outs[False]),
            "unpadded_cudnn_vs_cpu": agreement(outs[True], cpu)}


def graph_checks(d: Path, prompts, tmp: Path) -> dict:
    """Decode steps replayed from CUDA graphs vs the same policy run eagerly: resident, mixed
    placements, whole streamed units, two GPU batches, 4-bit weights (the fused matmul
    captured), and a second, shorter block that reuses the first block's slots and graphs."""
    pols = {"resident": Policy(gpu_batch_size=8),
            "two_batches": Policy(gpu_batch_size=4, num_gpu_batches=2),
            "mixed": Policy(gpu_batch_size=3, num_gpu_batches=2, weights_gpu=50, weights_cpu=50,
                            cache_gpu=50, cache_cpu=50),
            # KV on the GPU: whole units streamed (from RAM and disk), the rest captured;
            # without graphs every unit streams its share (footprint.weight_tiers)
            "whole_units": Policy(gpu_batch_size=4, num_gpu_batches=2, weights_gpu=55,
                                  weights_cpu=30, weights_disk=15)}
    row = {}
    for name, pol in list(pols.items()) + [("w4", Policy(gpu_batch_size=8))]:
        outs, caps = {}, 0
        for graphs in (False, True):
            pol.cuda_graphs = graphs
            with LLM(str(d), device="cuda", policy=pol, offload_dir=str(tmp),
                     compress_weight=name == "w4") as llm:
                outs[graphs] = [o.output_ids for o in llm.generate(prompts, 16, GREEDY)]
                outs[graphs] += [o.output_ids for o in llm.generate(prompts[3:6], 9, GREEDY)]
                # fewer rows in a last batch, then the first shape again: graphs recaptured
                outs[graphs] += [o.output_ids for o in llm.generate(prompts[:5], 12, GREEDY)]
                outs[graphs] += [o.output_ids for o in llm.generate(prompts, 7, GREEDY)]
                if graphs:
                    caps = llm.pipeline.graphs.captures
        row[f"graphs_{name}"] = agreement(outs[True], outs[False])
        row[f"graphs_{name}_captures"] = caps
    return row


def cpu_attention_kernels(out: dict) -> None:
    b, nh, T, hd = 32, 56, 544, 128
    res = {}
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        K = torch.randn(b, nh, T, hd).to(dt)
        V = torch.randn(b, nh, T, hd).to(dt)
        q = torch.randn(b, nh, 1, hd).to(dt)
        mask = torch.ones(b, 1, 1, T, dtype=torch.bool)
        F.scaled_dot_product_attention(q, K, V, attn_mask=mask)
        t0 = time.perf_counter()
        for _ in range(3):
            F.scaled_dot_product_attention(q, K, V, attn_mask=mask)
        ms = (time.perf_counter() - t0) / 3 * 1e3
        res[str(dt)] = {"ms": ms, "GBps": 2 * K.numel() * K.element_size() / ms / 1e6}
    out["cpu_attention_sdpa_b32_h56_T544"] = res
    print("cpu attention", res, flush=True)


def throughput(model: str, policy: Policy, prompt_len: int, gen: int, n: int, tmp: Path,
               trace: str | None = None, **kw) -> dict:
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, 1000, (n, prompt_len), generator=g).tolist()
    t0 = time.perf_counter()
    with LLM(model, device="cuda", policy=policy, offload_dir=str(tmp), trace=trace, **kw) as llm:
        load_s = time.perf_counter() - t0
        llm.generate(prompts[:policy.block_size], 2, GREEDY)    # warm-up
        llm.stats = type(llm.stats)()
        outs = llm.generate(prompts, gen, GREEDY)
        st = llm.stats
    total = st.prefill_s + st.decode_s
    r = {"model": model, "policy": policy.to_dict(), "prompt_len": prompt_len, "gen_len": gen,
         "num_prompts": n, "load_s": load_s, "prefill_s": st.prefill_s, "decode_s": st.decode_s,
         "decode_step_ms": st.decode_s / max(gen - 1, 1) * 1e3,
         "total_tok_s": n * gen / total, "decode_tok_s": n * (gen - 1) / max(st.decode_s, 1e-9),
         "peak_gpu_GiB": st.peak_gpu_bytes / 2**30, "peak_rss_GiB": st.peak_rss_bytes / 2**30,
         "first_tokens": outs[0].output_ids[:8]}
    print(json.dumps(r), flush=True)
    return r


def main() -> None:
    out_dir = Path(sys.argv[1])
    tmp = Path("/tmp/flexrun-smoke")
    tmp.mkdir(exist_ok=True)
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    what = sys.argv[2].split(",") if len(sys.argv) > 2 else ["tiny", "families", "attn", "s3",
                                                               "offload"]
    try:
        if "tiny" in what:
            tiny_checks(tmp, out)
        elif "tiny-llama" in what:
            tiny_checks(tmp, out, "llama")
        if "families" in what:
            from bench.gpu_families import SHAPES, family_rows
            out["families"] = family_rows(tmp, sorted(SHAPES))
        if "attn" in what:
            cpu_attention_kernels(out)
        if "s3" in what:
            out["s3_opt6.7b_b32"] = throughput("dummy:opt-6.7b", Policy(gpu_batch_size=32),
                                               512, 32, 32, tmp)
        if "offload" in what:
            pol = Policy(gpu_batch_size=32, num_gpu_batches=2, weights_gpu=20, weights_cpu=80,
                         cache_gpu=0, cache_cpu=100, act_gpu=0, act_cpu=100, cpu_attention=True)
            out["opt1.3b_flexgen_policy"] = throughput("dummy:opt-1.3b", pol, 512, 8, 64, tmp,
                                                       trace=str(out_dir / "trace-1.3b.json"))
    finally:
        (out_dir / "smoke.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
