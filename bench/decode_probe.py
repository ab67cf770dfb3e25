"""Where does an offloaded decode step go? Micro-benchmarks at the model's own decode shapes,
then the real pipeline under several engine variants, all on one load of the model.

python -m bench.decode_probe OUT --model dummy:opt-30b --policy policies/x.json \
    --gpu-mem 16GiB --cpu-mem 100GiB --num-prompts 64 --gen-len 6

Writes OUT/probe.jsonl, one JSON object per measurement, flushed as it goes (a run cut
short keeps what it measured). Variants: the piece size of weight copies (MB; FLEXRUN_H2D_CHUNK_MB)
and activations on GPU or as the policy says. --profile writes the
torch.profiler tables of the last variant's decode steps to OUT/profile.txt.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from flexrun import LLM, Policy, SamplingParams

from flexrun.memory import pinned
from flexrun.engine.attention import attend
from flexrun.plan.timing import attention_beside_h2d, best_time, copy_bw
from bench.run_flexrun import warm_up
from torch.profiler import ProfilerActivity, profile


def _emit(out: Path, rec: dict) -> None:
    print(json.dumps(rec), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")


def micro(out: Path, b: int, heads: int, kv_heads: int, T: int, hd: int) -> None:
    """Host attention per kernel at the decode shape, alone and beside a pinned H2D stream."""
    buf = torch.randn(b, kv_heads, T + 8, hd).half()
    K, V = buf[:, :, :T], buf[:, :, 8:T + 8]
    q = torch.randn(b, heads, 1, hd).half()
    mask = torch.ones(b, 1, 1, T, dtype=torch.bool)
    kv_bytes = 2 * K.numel() * 2
    for m in (None, mask):
        s = best_time(lambda: attend(q, K, V, m))
        _emit(out, {"what": "host attention", "mask": m is not None,
                    "shape": [b, heads, kv_heads, T, hd], "ms": s * 1e3,
                    "GB_s": kv_bytes / s / 1e9, "threads": torch.get_num_threads()})
    if not torch.cuda.is_available():
        return
    dev = torch.device("cuda")
    _, a, h2d = attention_beside_h2d(dev, lambda: attend(q, K, V, None), 1 << 30)
    _emit(out, {"what": "host attention + concurrent 1 GB H2D", "attn_ms": a * 1e3,
                "attn_GB_s": kv_bytes / a / 1e9, "h2d_GB_s": h2d / 1e9})
    host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    alone = copy_bw(host, torch.empty_like(host, device=dev), torch.cuda.synchronize)
    _emit(out, {"what": "pinned 1 GB H2D alone", "GB_s": alone / 1e9})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--model", required=True)
    ap.add_argument("--policy", required=True)
    ap.add_argument("--gpu-mem", default=None)
    ap.add_argument("--cpu-mem", default=None)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=6)
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--variants", default="16:policy,16:gpu",
                    help="chunk_MB:activations (policy or gpu), comma separated")
    ap.add_argument("--compress-weight", action="store_true")
    ap.add_argument("--compress-cache", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--skip-micro", action="store_true")
    a = ap.parse_args()
    out = Path(a.out) / "probe.jsonl"
    policy = Policy.load(a.policy)
    t0 = time.perf_counter()
    llm = LLM(a.model, policy=policy, gpu_mem=a.gpu_mem, cpu_mem=a.cpu_mem,
              offload_dir=tempfile.mkdtemp(prefix="flexrun-probe-"),
              compress_weight=a.compress_weight, compress_cache=a.compress_cache)
    _emit(out, {"what": "load", "s": time.perf_counter() - t0})
    spec = llm.spec
    if not a.skip_micro:
        micro(out, policy.gpu_batch_size, spec.num_heads, spec.num_kv_heads,
              a.prompt_len + a.gen_len, spec.head_dim)
    with llm:
        n = a.num_prompts or policy.block_size
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(10, min(spec.vocab_size, 30000), (n, a.prompt_len),
                                generator=g).tolist()
        greedy = SamplingParams(ignore_eos=True)
        t1 = time.perf_counter()
        warm_up(llm, prompts, a.gen_len)
        _emit(out, {"what": "warm-up", "s": time.perf_counter() - t1})
        pipe = llm.pipeline
        policy_acts = dict(pipe.act_tiers)
        first = None
        variants = a.variants.split(",")
        for i, v in enumerate(variants):
            chunk_mb, acts = v.split(":")
            pinned.H2D_CHUNK = int(chunk_mb) << 20
            pipe.act_tiers = ({u: "gpu" for u in policy_acts} if acts == "gpu"
                              else dict(policy_acts))
            llm.stats = type(llm.stats)(weights_split=llm.stats.weights_split)
            res = llm.generate(prompts, a.gen_len, greedy)
            st = llm.stats
            toks = [r.output_ids for r in res]
            first = first or toks
            _emit(out, {"what": "pipeline", "variant": v, "prefill_s": st.prefill_s,
                        "decode_step_s": st.decode_s / max(a.gen_len - 1, 1),
                        "same_tokens_as_first": toks == first})
        if a.profile:
            _profile_decode(llm, prompts[:policy.block_size], Path(a.out) / "profile.txt")


def _profile_decode(llm: LLM, prompts: list[list[int]], out: Path, gen: int = 4) -> None:
    """torch.profiler tables of one block's decode steps alone (it starts once the prefill
    step ended), sorted by host time and by device time. One process (the on_step callback
    of a multi-GPU run fires after its block)."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                     else [])
    prof = profile(activities=acts)
    run_block = llm.pipeline.run_block

    def started(batches, max_new_tokens, sampler, on_step=None):
        def step(s, t=None):
            if on_step is not None:
                on_step(s) if t is None else on_step(s, t)
            if s == 0:
                prof.start()
        run_block(batches, max_new_tokens, sampler, on_step=step)
    llm.pipeline.run_block = started
    t0 = time.perf_counter()
    try:
        llm.generate(prompts[:llm.policy.block_size], gen, SamplingParams(ignore_eos=True))
    finally:
        llm.pipeline.run_block = run_block
        if prof.profiler is not None:           # (started: step 0 ended)
            prof.stop()
    with open(out, "w") as f:
        f.write(f"{gen} tokens in {time.perf_counter() - t0:.2f} s (profiled from step 1)\n")
        for key in ("self_cpu_time_total", "self_device_time_total", "device_time_total"):
            try:
                f.write(f"== {key}\n" + prof.key_averages().table(sort_by=key, row_limit=30)
                        + "\n")
            except Exception as e:              # (a key this torch does not know)
                f.write(f"== {key}: {e}\n")

if __name__ == "__main__":
    main()
