"""One GPU actor beside CPU actors on one host (Ray Data), against the single-process GPU run.

python -m bench.ray_mixed --model dummy:opt-1.3b --num-prompts 1024 --prompt-len 128 \
    --gen-len 32 --cpu-workers 2 --cpu-threads 4 [-o OUT.json]

The single-process run (flexrun on the GPU, policy auto, one warm-up call) goes first and is
closed before Ray starts. Then a local Ray (CPUs: the CPU actors' plus one per GPU actor and
two spare; GPU: 1) runs two actor pools over one dataset split by the cost model's predicted
rates: `map_generate(..., num_gpus=1)` for the GPU share and `map_generate(..., num_gpus=0)`
with `--cpu-workers` actors for the rest, unioned and collected. Reported: tok/s of the whole
Ray job (actor start and model build included, and from the first to the last output, without
them), beside the single-process tok/s; whether the GPU actor's rows equal the single-process
rows (same device and dtype: they must), and the CPU actors' agreement with them (another
device and dtype: reported, not required).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from flexrun import LLM, SamplingParams
from flexrun.config import parse_size
from flexrun.models.loader import open_checkpoint
from flexrun.engine.device import resolve_dtype
from flexrun.plan.hardware import default_profile
from flexrun.plan.search import search
from flexrun.ray import GenerateConfig, HostShare, map_generate, shared_budgets, shared_profile


GPU = "cuda" if torch.cuda.is_available() else "cpu"    # no GPU: a CPU smoke of the script


def sync() -> None:
    if GPU == "cuda":
        torch.cuda.synchronize()


def prompts_for(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, min(vocab, 30000), (n, length), generator=g).tolist()


def split_rows(rows: list, cpu_fraction: float, batch: int) -> tuple[list, list]:
    """(GPU rows, CPU rows): the GPU takes whole calls of `batch` rows from the start, as the
    single-process run batches them, and the CPU actors the rest; the number of GPU calls is
    the one that leaves the CPU actors nearest their share (rounding up to a whole GPU call
    instead would make the slow CPU actors the job's tail)."""
    n = len(rows)
    calls = round(n * (1.0 - cpu_fraction) / batch)
    n_gpu = min(n, calls * batch)
    return rows[:n_gpu], rows[n_gpu:]


def blocks(rows: list, size: int):
    """A dataset of one block per `size` rows (map_batches' calls of `size` rows then hold
    exactly these rows: from_items' block count splits rows evenly, not by size)."""
    import pandas as pd
    import ray
    return ray.data.from_pandas([pd.DataFrame(rows[i:i + size])
                                 for i in range(0, len(rows), size)])


def single_process(a, prompts) -> tuple[float, list[list[int]], str]:
    """tok/s and output ids of the plain run on the GPU (warm-up call first)."""
    llm = LLM(a.model, device=GPU, policy="auto", gpu_mem=a.gpu_mem, cpu_mem=a.cpu_mem,
              workload=(a.prompt_len, a.gen_len, a.batch_size))
    greedy = SamplingParams(ignore_eos=True)
    llm.generate(prompts[:a.batch_size], 2, greedy)
    sync()
    t = time.perf_counter()
    outs = []
    for i in range(0, len(prompts), a.batch_size):      # map_batches' calls, one by one
        outs += [o.output_ids for o in llm.generate(prompts[i:i + a.batch_size], a.gen_len,
                                                    greedy)]
    sync()
    dt = time.perf_counter() - t
    line = llm.plan.line() if llm.plan is not None else str(llm.policy)
    llm.close()
    del llm
    if GPU == "cuda":
        torch.cuda.empty_cache()
    return len(prompts) * a.gen_len / dt, outs, line


def predicted(a, spec, device: str, share: HostShare) -> float:
    """The cost model's tok/s for one actor of this kind (its share of the host)."""
    prof = shared_profile(default_profile(torch.device(device)), share)
    gpu, cpu, disk = shared_budgets(a.gpu_mem if device == "cuda" else None, a.cpu_mem, None,
                                    share)
    dtype = resolve_dtype(None, torch.device(device), spec.family)
    batch = a.batch_size if device == "cuda" else a.cpu_batch_size
    res = search(spec, prof, a.prompt_len, a.gen_len, gpu, cpu, disk, device, dtype.itemsize,
                 num_prompts=batch)
    return res.prediction.throughput


def ray_job(a, prompts, cpu_fraction: float) -> dict:
    import ray
    cpus = a.cpu_workers * a.cpu_threads + a.gpu_threads + 2
    ray.init(num_cpus=cpus, num_gpus=int(GPU == "cuda"), include_dashboard=False,
             log_to_driver=False)
    try:
        rows = [{"id": str(i), "input_ids": p} for i, p in enumerate(prompts)]
        gpu_rows, cpu_rows = split_rows(rows, cpu_fraction if a.cpu_workers else 0.0,
                                        a.batch_size)
        k = a.cpu_workers + 1                           # actors on this host
        host = parse_size(a.cpu_mem)
        base = dict(model=a.model, max_new_tokens=a.gen_len, ignore_eos=True)
        t0 = time.perf_counter()
        parts = []
        if gpu_rows:        # the GPU actor: the host's links to itself, 1/k of its memory
            parts.append(map_generate(
                blocks(gpu_rows, a.batch_size),
                GenerateConfig(device=GPU, gpu_mem=a.gpu_mem, cpu_mem=host // k,
                               actors_per_host=1, workload=(a.prompt_len, a.gen_len,
                                                            a.batch_size), **base),
                workers=1, num_cpus=a.gpu_threads, num_gpus=int(GPU == "cuda"),
                batch_size=a.batch_size))
        if cpu_rows:        # CPU actors: 1/k of the host each
            parts.append(map_generate(
                blocks(cpu_rows, a.cpu_batch_size),
                GenerateConfig(device="cpu", cpu_mem=host, actors_per_host=k,
                               workload=(a.prompt_len, a.gen_len, a.cpu_batch_size), **base),
                workers=a.cpu_workers, num_cpus=a.cpu_threads, batch_size=a.cpu_batch_size))
        ds = parts[0] if len(parts) == 1 else parts[0].union(parts[1])
        out, first = {}, None
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            first = first or time.perf_counter()
            for i, ids in zip(batch["id"], batch["output_ids"]):
                out[str(i)] = [int(x) for x in ids]
        t1 = time.perf_counter()
    finally:
        ray.shutdown()
    return {"outputs": out, "gpu_rows": len(gpu_rows), "cpu_rows": len(cpu_rows),
            "wall_s": t1 - t0, "first_output_s": (first or t1) - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dummy:opt-1.3b")
    ap.add_argument("--num-prompts", type=int, default=16384)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128, help="rows per GPU actor call")
    ap.add_argument("--cpu-batch-size", type=int, default=16, help="rows per CPU actor call")
    ap.add_argument("--gpu-mem", default="70GiB")
    ap.add_argument("--cpu-mem", default="100GiB", help="the host's, shared by the actors")
    ap.add_argument("--cpu-workers", type=int, default=2)
    ap.add_argument("--cpu-threads", type=int, default=4, help="CPUs per CPU actor")
    ap.add_argument("--gpu-threads", type=int, default=2, help="CPUs of the GPU actor")
    ap.add_argument("--cpu-fraction", type=float, default=None,
                    help="rows for the CPU actors (default: their predicted share)")
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()
    spec = open_checkpoint(a.model).spec
    prompts = prompts_for(a.num_prompts, a.prompt_len, spec.vocab_size)
    single, ref, line = single_process(a, prompts)
    print(f"single process: {single:.1f} tok/s ({line})", flush=True)
    k = a.cpu_workers + 1
    gpu_pred = predicted(a, spec, GPU, HostShare(1 if GPU == "cuda" else k))
    cpu_pred = predicted(a, spec, "cpu", HostShare(k)) if a.cpu_workers else 0.0
    frac = a.cpu_fraction
    if frac is None:
        frac = a.cpu_workers * cpu_pred / (a.cpu_workers * cpu_pred + gpu_pred)
    r = ray_job(a, prompts, frac)
    out = r.pop("outputs")
    missing = [i for i in range(len(prompts)) if str(i) not in out]
    gpu_ids = range(r["gpu_rows"])
    cpu_ids = range(r["gpu_rows"], len(prompts))
    same_gpu = all(out.get(str(i)) == ref[i] for i in gpu_ids)
    tok_agree = [sum(x == y for x, y in zip(out[str(i)], ref[i])) / a.gen_len
                 for i in cpu_ids if str(i) in out]
    tokens = len(out) * a.gen_len
    device = torch.cuda.get_device_name() if GPU == "cuda" else "cpu (no GPU: a smoke run)"
    res = {"model": a.model, "device": device, "num_prompts": a.num_prompts,
           "prompt_len": a.prompt_len, "gen_len": a.gen_len, "batch_size": a.batch_size,
           "single_tok_s": single, "single_policy": line,
           "predicted_tok_s": {"gpu_actor": gpu_pred, "cpu_actor": cpu_pred},
           "cpu_fraction": frac, **r,
           "ray_tok_s": tokens / r["wall_s"],
           "ray_tok_s_after_first_output": tokens / max(r["wall_s"] - r["first_output_s"],
                                                        1e-9),
           "ratio_to_single": tokens / r["wall_s"] / single,
           "missing_ids": len(missing), "gpu_actor_rows_equal_single": same_gpu,
           "cpu_actor_token_agreement": sum(tok_agree) / len(tok_agree) if tok_agree else None,
           "command": " ".join(["python -m bench.ray_mixed"] + sys.argv[1:])}
    print(json.dumps(res, indent=1))
    if a.output:
        with open(a.output, "w") as f:
            json.dump(res, f, indent=1)
    ok = not missing and same_gpu
    print("RAY MIXED", "OK" if ok else "DIFFERS")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
