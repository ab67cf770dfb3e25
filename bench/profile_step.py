"""Profile one configuration's decode steps with torch.profiler (GPU machine).

python -m bench.profile_step OUT_DIR MODEL BATCH PROMPT GEN [policy.json]
"""
from __future__ import annotations

import gzip
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from flexrun import LLM, Policy, SamplingParams


def main() -> None:
    out, model, bs, plen, gen = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    pol = Policy.load(sys.argv[6]) if len(sys.argv) > 6 else Policy(gpu_batch_size=bs)
    x = torch.empty(512 << 20, dtype=torch.uint8, pin_memory=True)
    y = torch.empty_like(x, device="cuda")
    y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        y.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    print(f"pinned H2D {5 * x.numel() / (time.perf_counter() - t0) / 1e9:.1f} GB/s")
    prompts = torch.randint(10, 1000, (pol.block_size, plen)).tolist()
    g = SamplingParams(ignore_eos=True)
    with LLM(model, device="cuda", policy=pol, offload_dir="/tmp") as llm:
        llm.generate(prompts, 2, g)
        for overlap in (True, False):
            llm.policy.overlap = overlap
            llm.stats = type(llm.stats)()
            llm.generate(prompts, gen, g)
            st = llm.stats
            print(f"overlap={overlap} prefill {st.prefill_s:.3f}s decode step "
                  f"{st.decode_s / (gen - 1) * 1e3:.2f} ms")
        llm.policy.overlap = True
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts, gen, g)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    trace = Path(out) / "torch-trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as f, gzip.open(str(trace) + ".gz", "wb") as g:
        g.write(f.read())
    trace.unlink()


if __name__ == "__main__":
    main()
