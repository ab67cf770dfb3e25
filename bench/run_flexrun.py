"""Measure one flexrun configuration and print one JSON line (used by bench.run).

python -m bench.run_flexrun --model dummy:opt-30b --policy policies/x.json|auto \
    --prompt-len 512 --gen-len 32 --num-prompts 64 [--gpu-mem 16GiB --cpu-mem 100GiB]

FLEXRUN_BENCH_STACKS=FILE dumps every thread's stack into FILE every 15 s (faulthandler reads
the other threads' frames while they run: one S7 run died of a segfault with it on).
FLEXRUN_BENCH_MEMTRACE=FILE writes which code took the warm-up's GPU memory (bench/mem_history.py).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import tempfile
import time

import torch

from bench import mem_history
from flexrun import LLM, Policy, SamplingParams
from flexrun.engine.budget import settled_rss


def warm_up(llm: LLM, prompts: list[list[int]], gen_len: int) -> None:
    """Keep one-time costs out of the steady-state figures: one block of short prompts and two
    tokens compiles the decode kernels at the measured batch (Triton's 4-bit matmul among
    them); one block at the measured lengths that every token stops after the prefill sizes
    the KV slots for prompt + gen (pinned ones included); then, on a GPU, the same prompts
    generating two tokens, in those slots, capture the decode step's CUDA graphs at the
    measured shapes. No call exceeds the measured lengths, so a policy planned for them fits
    its budget."""
    block = prompts[:llm.policy.block_size]
    greedy = SamplingParams(ignore_eos=True)
    llm.generate([p[:8] for p in block], 2, greedy)
    _gpu_peak(llm, "short prompts, 2 tokens")
    stop_all = SamplingParams(stop_token_ids=list(range(llm.spec.vocab_size)))
    llm.generate(block, gen_len, stop_all)
    _gpu_peak(llm, "measured prompts, prefill only")
    if gen_len >= 2 and llm.device.type == "cuda":
        llm.generate(block, 2, greedy)
        _gpu_peak(llm, "measured prompts, 2 tokens")


def _gpu_peak(llm: LLM, what: str) -> None:
    """The GPU peak so far (stderr): which warm-up call first took the memory."""
    if llm.device.type == "cuda":
        print(f"[bench] GPU peak after warm-up ({what}): allocated "
              f"{torch.cuda.max_memory_allocated(llm.device) / 1e9:.2f} GB, reserved "
              f"{torch.cuda.max_memory_reserved(llm.device) / 1e9:.2f} GB", file=sys.stderr,
              flush=True)


def memory_record(llm: LLM, a, host_rss: dict) -> dict:
    """Where the memory went, beside the peaks: the planner's footprint per tier and part, the
    host's anonymous RSS (settled: freed heap trimmed) after each phase, and on a GPU the
    allocator's reserved bytes per stream at the end (one stream's cached blocks cannot serve
    another's allocations)."""
    from flexrun.plan.footprint import footprint
    fp = footprint(llm.spec, llm.policy, llm.dtype.itemsize, a.prompt_len, a.gen_len,
                   cuda=llm.device.type == "cuda")
    gb = lambda x: round(x / 1e9, 3)    # noqa: E731
    out = {"footprint_GB": {
        **{t: gb(fp.total(t)) for t in ("gpu", "cpu", "disk")},
        "weights": {t: gb(v) for t, v in fp.weights.items()},
        "cache": {t: gb(v) for t, v in fp.cache.items()},
        "buffers": gb(fp.buffers), "host": gb(fp.host), "load": gb(fp.load)},
        "host_rss_GB": {k: gb(v) for k, v in host_rss.items()}}
    if llm.device.type == "cuda":
        dev = llm.device.index if llm.device.index is not None else torch.cuda.current_device()
        pools = mem_history.stream_pools(torch.cuda.memory_snapshot(), dev)
        out["reserved_by_stream_GB"] = {hex(k): {"reserved": gb(r), "allocated": gb(al)}
                                        for k, (r, al, _) in pools.items()}
    return out


def log_steps(llm: LLM) -> None:
    """Print each step's wall time to stderr as it ends, so a run that times out still shows
    its prefill and decode step times (steps after the prefill are not synchronised: a figure
    is when the host finished queueing the step)."""
    run_block = llm.pipeline.run_block

    def logged(batches, max_new_tokens, sampler, on_step=None):
        last = [time.perf_counter()]

        def step(s, t=None):
            if on_step is not None:
                on_step(s) if t is None else on_step(s, t)
            now = time.perf_counter()
            print(f"[bench] step {s}: {now - last[0]:.3f} s", file=sys.stderr, flush=True)
            last[0] = now
        run_block(batches, max_new_tokens, sampler, on_step=step)
    llm.pipeline.run_block = logged


def peaks_vs_budgets(llm: LLM) -> dict | None:
    """The peaks as the budget check counts them (engine/budget.py: GPU reserved + CUDA context,
    over the timed run, its peak reset after the warm-up; CPU anonymous RSS + pinned, since the
    load), beside --gpu-mem / --cpu-mem; None without budgets."""
    check = llm.budget
    if check is None or not check.active:
        return None
    p, gb = check.peaks(), 1e9
    out = {}
    if check.gpu_mem is not None:
        out.update(gpu_budget_GB=check.gpu_mem / gb, gpu_peak_GB=p.gpu / gb,
                   gpu_reserved_GB=p.gpu_reserved / gb, cuda_context_GB=check.context / gb,
                   gpu_within=p.gpu <= check.gpu_mem)
    if check.cpu_mem is not None:
        out.update(cpu_budget_GB=check.cpu_mem / gb, cpu_peak_GB=p.cpu / gb,
                   cpu_anon_GB=p.cpu_anon / gb, cpu_pinned_GB=p.cpu_pinned / gb,
                   cpu_within=p.cpu <= check.cpu_mem)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--policy", default=None)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--gpu-mem", default=None)
    ap.add_argument("--cpu-mem", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--offload-dir", default=None)
    ap.add_argument("--compress-weight", action="store_true")
    ap.add_argument("--compress-cache", action="store_true")
    ap.add_argument("--trace", default=None)
    a = ap.parse_args()
    if os.environ.get("FLEXRUN_BENCH_STACKS"):     # where a slow run spends its time
        faulthandler.dump_traceback_later(15, repeat=True,
                                          file=open(os.environ["FLEXRUN_BENCH_STACKS"], "w"))
    policy = a.policy if a.policy in (None, "auto") else Policy.load(a.policy)
    host_rss = {"start": settled_rss()}
    t0 = time.perf_counter()
    llm = LLM(a.model, device=a.device, policy=policy, gpu_mem=a.gpu_mem, cpu_mem=a.cpu_mem,
              offload_dir=a.offload_dir or tempfile.mkdtemp(prefix="flexrun-bench-"),
              dtype=a.dtype, compress_weight=a.compress_weight, compress_cache=a.compress_cache,
              trace=a.trace, workload=(a.prompt_len, a.gen_len, a.num_prompts))
    load_s = time.perf_counter() - t0
    print(f"[bench] loaded in {load_s:.1f} s: {llm.policy.to_dict()}", file=sys.stderr, flush=True)
    host_rss["loaded"] = settled_rss()
    load_peak = {}
    if llm.device.type == "cuda":       # the load's own peak (quantizing on the device), apart
        load_peak = {"load_peak_gpu_GB": torch.cuda.max_memory_allocated(llm.device) / 1e9,
                     "load_peak_reserved_GB": torch.cuda.max_memory_reserved(llm.device) / 1e9}
        print(f"[bench] GPU peak of the load: allocated {load_peak['load_peak_gpu_GB']:.2f} GB,"
              f" reserved {load_peak['load_peak_reserved_GB']:.2f} GB", file=sys.stderr)
        torch.cuda.reset_peak_memory_stats(llm.device)
    with llm:
        n = a.num_prompts or llm.policy.block_size
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(10, min(llm.spec.vocab_size, 30000), (n, a.prompt_len),
                                generator=g).tolist()
        greedy = SamplingParams(ignore_eos=True)
        memtrace = os.environ.get("FLEXRUN_BENCH_MEMTRACE") if llm.device.type == "cuda" \
            else None
        if memtrace:                    # which code took the warm-up's GPU memory
            mem_history.start()
        t1 = time.perf_counter()
        warm_up(llm, prompts, a.gen_len)            # its wall time is reported as warmup_s
        warmup_s = time.perf_counter() - t1
        if memtrace:
            mem_history.report(memtrace)
        print(f"[bench] warmed up in {warmup_s:.1f} s", file=sys.stderr, flush=True)
        host_rss["warmed_up"] = settled_rss()
        split = llm.stats.weights_split
        llm.stats = type(llm.stats)(weights_split=split)
        if llm.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        moe = llm.pipeline.model.moe_stats if llm.spec.num_experts else None
        lanes = llm.pipeline.experts if llm.spec.num_experts else None
        if moe is not None:
            moe.reset()
            lanes.stats = type(lanes.stats)()
        log_steps(llm)
        llm.generate(prompts, a.gen_len, greedy)
        st = llm.stats
        budget = peaks_vs_budgets(llm)
        host_rss["run"] = settled_rss()
        memory = memory_record(llm, a, host_rss)
        experts = None if moe is None else {
            "routing": moe.routing, "moe_layer_calls": moe.calls,
            "experts_touched_per_call": moe.experts_touched / max(moe.calls, 1),
            "experts": llm.spec.num_experts, "top_k": llm.spec.experts_per_token,
            "lanes": {**lanes.stats.to_dict(), "rates": vars(lanes.rates)},
            "off_device_experts": sum(len(v) for v in lanes.remote.values())}
        predicted, profile = None, None
        try:
            from flexrun.plan.costmodel import predict
            from flexrun.plan.hardware import default_profile, profile_source
            profile = profile_source(llm.device.type)
            p = predict(llm.spec, llm.policy, default_profile(llm.device.type), a.prompt_len,
                        a.gen_len, num_prompts=n, device=llm.device.type,
                        dtype_bytes=llm.dtype.itemsize)
            predicted = {k: v for k, v in vars(p).items() if isinstance(v, (int, float))}
        except Exception as e:          # the cost model is optional for a measurement
            predicted = {"error": str(e)}
    total = st.prefill_s + st.decode_s
    print("FLEXRUN_RESULT " + json.dumps({
        "model": a.model, "dtype": str(llm.dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(0) if llm.device.type == "cuda" else "cpu",
        "policy": llm.policy.to_dict(), "weights_split": st.weights_split,
        "prompt_len": a.prompt_len, "gen_len": a.gen_len, "num_prompts": n, "load_s": load_s,
        **load_peak, "warmup_s": warmup_s,
        "prefill_s": st.prefill_s, "decode_s": st.decode_s,
        "decode_step_s": st.decode_s / max(a.gen_len - 1, 1),
        "prefill_tok_s": n * a.prompt_len / st.prefill_s,
        "decode_tok_s": n * (a.gen_len - 1) / max(st.decode_s, 1e-9),
        "total_tok_s": n * a.gen_len / total, "peak_gpu_GB": st.peak_gpu_bytes / 1e9,
        "peak_rss_GB": st.peak_rss_bytes / 1e9, "peaks_vs_budgets": budget, **memory,
        "predicted": predicted, "profile": profile,
        **({"experts": experts} if experts else {})}))


if __name__ == "__main__":
    main()
