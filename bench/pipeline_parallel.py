"""Pipeline parallelism: N GPUs (one stage each) against 1 GPU with offloading, same budgets.

python -m bench.pipeline_parallel [--model dummy:opt-66b] [--gpus 2] [--prompt-len 512]
    [--gen-len 32] [--gpu-mem 70GiB] [--cpu-mem 100GiB] [--num-prompts N] [--profile hw.json]
    [--device cuda|cpu] [--offload-dir DIR]
Both runs use the cost model's policy: `search` for one GPU, `search_stages` (one placement per
stage, a 1/N share of --cpu-mem each) for N; --gpu-mem is per GPU. Each run is a subprocess
(`--one K`) so they never share host memory; the table shows measured and predicted
throughput, and bench/results/pipeline-parallel-<device>.json keeps everything.
A CPU check of the machinery (gloo): --model dummy:opt-125m --device cpu --gpus 2
--prompt-len 32 --gen-len 4 --num-prompts 8
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TAG = "PP_RESULT"


def plan(a, gpus: int, spec, dtype: torch.dtype):
    """(policy for LLM(...), predicted dict) from the cost model for `gpus` stages."""
    from flexrun.plan.search import search
    from flexrun.plan.stages import plan_stages
    from flexrun.plan.hardware import default_profile
    from flexrun.plan.stage_search import search_stages
    prof = default_profile(a.device)
    elem = dtype.itemsize
    budgets = dict(gpu_mem=a.gpu_mem, cpu_mem=a.cpu_mem, disk_mem=a.disk_mem, device=a.device,
                   dtype_bytes=elem, num_prompts=a.num_prompts,
                   compress_weight=a.compress_weight)
    if gpus == 1:
        res = search(spec, prof, a.prompt_len, a.gen_len, **budgets)
        pr = res.prediction
        return res.policy, {"prefill_s": pr.prefill_s, "decode_s": pr.decode_s,
                            "throughput_tok_s": pr.throughput}
    stages = plan_stages(spec, dtype, gpus, a.compress_weight)
    sp = search_stages(spec, prof, stages, a.prompt_len, a.gen_len, **budgets)
    return sp.policies, {"prefill_s": sp.prefill_s, "decode_s": sp.decode_s,
                         "throughput_tok_s": sp.throughput, "stages": sp.to_dict()["stages"]}


def measure(a, gpus: int) -> dict:
    """One configuration: plan, load, warm up, then time prefill + decode of the prompts."""
    from flexrun import LLM, SamplingParams
    from flexrun.api import _resolve_dtype
    from flexrun.models.loader import open_checkpoint
    dtype = _resolve_dtype(a.dtype, torch.device(a.device))
    policy, predicted = plan(a, gpus, open_checkpoint(a.model).spec, dtype)
    offload = tempfile.mkdtemp(prefix="flexrun-pp-", dir=a.offload_dir)
    t0 = time.perf_counter()
    try:
        with LLM(a.model, device=a.device, policy=policy, gpu_mem=a.gpu_mem, cpu_mem=a.cpu_mem,
                 disk_mem=a.disk_mem, offload_dir=offload, dtype=a.dtype, num_gpus=gpus) as llm:
            load_s = time.perf_counter() - t0
            block = llm.policy.block_size
            n = a.num_prompts or block
            g = torch.Generator().manual_seed(0)
            prompts = torch.randint(10, min(llm.spec.vocab_size, 30000), (n, a.prompt_len),
                                    generator=g).tolist()
            greedy = SamplingParams(ignore_eos=True)
            llm.generate(prompts[:block], 2, greedy)                    # warm-up
            llm.stats = type(llm.stats)(weights_split=llm.stats.weights_split)
            llm.generate(prompts, a.gen_len, greedy)
            st, stages = llm.stats, [[u.start, u.stop] for u in llm.stages]
            policies = [p.to_dict() for p in llm.stage_policies]
    finally:
        shutil.rmtree(offload, ignore_errors=True)
    total = st.prefill_s + st.decode_s
    return {"gpus": gpus, "device": torch.cuda.get_device_name(0) if a.device == "cuda"
            else "cpu", "stages": stages, "policies": policies,
            "weights_split": st.weights_split, "num_prompts": n, "load_s": load_s,
            "prefill_s": st.prefill_s, "decode_s": st.decode_s,
            "decode_step_s": st.decode_s / max(a.gen_len - 1, 1),
            "total_tok_s": n * a.gen_len / total,
            "decode_tok_s": n * (a.gen_len - 1) / max(st.decode_s, 1e-9),
            "peak_gpu_GB": st.peak_gpu_bytes / 1e9, "peak_rss_GB": st.peak_rss_bytes / 1e9,
            "predicted": predicted}


def run_one(a, gpus: int, argv: list[str]) -> dict:
    """`measure` in a subprocess; its last TAG line, or the error it ended with."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if a.profile:
        env["FLEXRUN_PROFILE"] = str(Path(a.profile).resolve())
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "bench.pipeline_parallel", *argv, "--one",
                            str(gpus)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return {"gpus": gpus, "error": f"timed out after {a.timeout}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(TAG + " "):
            return {**json.loads(line[len(TAG) + 1:]), "wall_s": time.time() - t0}
    err = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"gpus": gpus, "error": err, "rc": p.returncode}


def table(rows: list[dict]) -> str:
    head = (f"{'GPUs':>4} {'block':>8} {'weights g/c/d %':>16} {'prefill s':>10} "
            f"{'decode s':>9} {'tok/s':>9} {'pred tok/s':>10} {'peak GPU GB':>11} {'speedup':>8}")
    out, base = [head], None
    for r in rows:
        if "error" in r:
            out.append(f"{r['gpus']:>4} error: {r['error']}")
            continue
        p0 = r["policies"][0]
        base = base or r["total_tok_s"]
        w = "/".join(f"{r['weights_split'].get(t, 0):.0f}" for t in ("gpu", "cpu", "disk"))
        out.append(f"{r['gpus']:>4} {p0['gpu_batch_size']:>4}x{p0['num_gpu_batches']:<3} "
                   f"{w:>16} {r['prefill_s']:>10.2f} {r['decode_s']:>9.2f} "
                   f"{r['total_tok_s']:>9.2f} {r['predicted']['throughput_tok_s']:>10.2f} "
                   f"{r['peak_gpu_GB']:>11.2f} {r['total_tok_s'] / base:>7.2f}x")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dummy:opt-66b")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--num-prompts", type=int, default=None, help="default: one block")
    ap.add_argument("--gpu-mem", default=None, help="per GPU (default: 90%% of the profile's)")
    ap.add_argument("--cpu-mem", default=None, help="the host's, shared by the stages")
    ap.add_argument("--disk-mem", default=None)
    ap.add_argument("--device", choices=["cuda", "cpu"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--compress-weight", action="store_true")
    ap.add_argument("--profile", default=None, help="hardware profile JSON for the cost model")
    ap.add_argument("--offload-dir", default=None)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per configuration")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    if a.one is not None:
        print(TAG + " " + json.dumps(measure(a, a.one)), flush=True)
        return
    rows = []
    for gpus in dict.fromkeys((1, a.gpus)):
        rows.append(run_one(a, gpus, argv))
        print(f"{gpus} GPU(s): " + json.dumps(rows[-1]), flush=True)
    device = next((r["device"] for r in rows if "device" in r), a.device).replace(" ", "-")
    res = {"model": a.model, "prompt_len": a.prompt_len, "gen_len": a.gen_len,
           "gpu_mem": a.gpu_mem, "cpu_mem": a.cpu_mem,
           "command": "python -m bench.pipeline_parallel " + " ".join(argv),
           "date": time.strftime("%Y-%m-%d %H:%M"), "runs": rows}
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"pipeline-parallel-{device}.json"
    path.write_text(json.dumps(res, indent=1))
    print(table(rows))
    print("wrote", path)


if __name__ == "__main__":
    main()
