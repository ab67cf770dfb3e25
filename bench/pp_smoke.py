"""Pipeline stages on ONE GPU: two stage processes share it (gloo messages), same tokens as one.

python -m bench.pp_smoke OUT_DIR [cuda|cpu] [gloo|nccl]
    gloo (default): both stages on one GPU, messages through host memory;
    nccl: one GPU per stage (a machine with two GPUs)
Checks the CUDA side of a staged run (streams, offloaded weights / KV / activations per stage,
CPU attention, early stops) that the CPU tests cannot; NCCL itself needs two GPUs.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import ragged_prompts, tiny_llama, tiny_opt  # noqa: E402
from flexrun import LLM, Policy, SamplingParams  # noqa: E402

GREEDY = SamplingParams(ignore_eos=True)
RESIDENT = Policy(gpu_batch_size=2, num_gpu_batches=3)
OFFLOADED = Policy(gpu_batch_size=2, num_gpu_batches=3, weights_gpu=20, weights_cpu=50,
                   weights_disk=30, cache_gpu=0, cache_cpu=100, act_gpu=0, act_cpu=100,
                   cpu_attention=True)
MIXED = Policy(gpu_batch_size=2, num_gpu_batches=3, weights_gpu=0, weights_cpu=100,
               cache_gpu=50, cache_cpu=0, cache_disk=50, act_gpu=50, act_disk=50)


def ids(outs) -> list[list[int]]:
    return [o.output_ids for o in outs]


def check(d: Path, name: str, policy, ref_policy: Policy, prompts, sampling, tmp: str,
          device: str) -> dict:
    """One process with ref_policy vs two stages with `policy` (one, or a list per stage)."""
    with LLM(str(d), device=device, policy=ref_policy, offload_dir=tmp) as llm:
        ref = llm.generate(prompts, 12, sampling)
    t0 = time.perf_counter()
    with LLM(str(d), device=device, policy=policy, offload_dir=tmp, num_gpus=2) as llm:
        got = llm.generate(prompts, 12, sampling)
        split = llm.stats.weights_split
    same = ids(got) == ids(ref) and [o.finish_reason for o in got] == \
        [o.finish_reason for o in ref]
    row = {"case": name, "same_tokens": same, "weights_split": split,
           "s": round(time.perf_counter() - t0, 2)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    dev = sys.argv[2] if len(sys.argv) > 2 else "cuda"
    backend = sys.argv[3] if len(sys.argv) > 3 else "gloo"
    os.environ["FLEXRUN_DIST_BACKEND"] = backend    # gloo: two stages on the one GPU
    os.environ.setdefault("FLEXRUN_DIST_TIMEOUT", "120")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prompts = ragged_prompts(9)
        for arch, make in (("opt", tiny_opt), ("llama", tiny_llama)):
            d = make(Path(tmp) / arch)
            off = str(Path(tmp) / "offload")
            Path(off).mkdir(exist_ok=True)
            with LLM(str(d), device=dev, policy=RESIDENT) as llm:
                first = [o.output_ids[1] for o in llm.generate(prompts[:2], 4, GREEDY)]
            cases = [("resident", RESIDENT, RESIDENT, GREEDY),
                     ("offloaded", OFFLOADED, OFFLOADED, GREEDY),
                     ("own policy per stage", [OFFLOADED, MIXED], OFFLOADED, GREEDY),
                     ("stop ids", RESIDENT, RESIDENT, SamplingParams(stop_token_ids=first)),
                     ("seeded sampling", RESIDENT, RESIDENT,
                      SamplingParams(temperature=0.8, top_k=20, seed=3, ignore_eos=True))]
            for name, pol, ref, sampling in cases:
                rows.append(check(d, f"{arch} {name}", pol, ref, prompts, sampling, off, dev))
    res = {"all_same": all(r["same_tokens"] for r in rows), "backend": backend, "rows": rows}
    (out / "pp_smoke.json").write_text(json.dumps(res, indent=1))
    print("ALL SAME" if res["all_same"] else "MISMATCH", flush=True)


if __name__ == "__main__":
    main()
