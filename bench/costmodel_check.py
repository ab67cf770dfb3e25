"""Predicted vs measured: the cost model's prefill and decode-step times against runs here.

python -m bench.costmodel_check [--device cpu|cuda] [--pairs 5] [-o OUT.json]

cpu: dummy:opt-125m (fp32), 4 prompts x 64 tokens, 6 new, Policy(gpu_batch_size=4,
     weights_gpu=0, weights_disk=100): every step maps the weights from the page cache. Each
     pair is a fresh profile of this machine (hardware.measure, as `flexrun profile` does,
     with a 64 MiB disk file) and the best of two runs right after it; the median ratio over
     the pairs is the check (this shared VM's speed drifts by 20-30% within a minute). A
     resident row (weights 100% on the cpu tier) runs in the same pairs, for contrast.
     The cores other processes kept busy during each pair (its profile and runs) and the
     whole check are reported: with another process on one of 2 cores, torch's 2-thread
     kernels stall and the profile or the runs say nothing.
cuda: the shipped profile of the GPU present (hardware.profile_path; FLEXRUN_PROFILE
     overrides it), fp16, prompt 512, gen 8, best of two runs after bench.run_flexrun's
     warm-up: opt-6.7b all on the GPU (batch 32) and opt-13b with half its weights on the
     CPU (batch 32).
Results: a table and bench/results/costmodel-check-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.run_flexrun import warm_up
from flexrun import LLM, Policy, SamplingParams
from flexrun.plan.costmodel import predict
from flexrun.plan.hardware import HardwareProfile, default_profile, measure, profile_path

ROOT = Path(__file__).resolve().parents[1]
CPU_ROWS = {  # name: (model, policy, prompt_len, gen_len)
    "opt-125m disk": ("dummy:opt-125m", Policy(gpu_batch_size=4, weights_gpu=0,
                                               weights_disk=100), 64, 6),
    "opt-125m resident": ("dummy:opt-125m", Policy(gpu_batch_size=4, weights_gpu=0,
                                                   weights_cpu=100), 64, 6),
}
CUDA_ROWS = {
    "opt-6.7b all GPU b32": ("dummy:opt-6.7b", Policy(gpu_batch_size=32), 512, 8),
    "opt-13b w 50/50 GPU/CPU b32": ("dummy:opt-13b", Policy(gpu_batch_size=32, weights_gpu=50,
                                                             weights_cpu=50), 512, 8),
}
DISK_BYTES = 64 << 20       # the profile's disk file (the old pytest check's size)
BUSY = 0.3                  # cores other processes may use before the CPU timings mean little


def busy_ticks() -> tuple[int, int, float]:
    """(CPU busy ticks of all processes, of this process, monotonic time)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    with open("/proc/self/stat") as f:
        s = f.read().rsplit(")", 1)[1].split()
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7], int(s[11]) + int(s[12]), time.monotonic()


def others_cores(a: tuple, b: tuple) -> float:
    """Cores other processes kept busy on average between two busy_ticks() readings."""
    return ((b[0] - a[0]) - (b[1] - a[1])) / os.sysconf("SC_CLK_TCK") / max(b[2] - a[2], 1e-9)


def prompts_for(llm: LLM, n: int, prompt_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, min(llm.spec.vocab_size, 30000), (n, prompt_len),
                         generator=g).tolist()


def best_of(llm: LLM, prompts: list[list[int]], gen_len: int, runs: int = 2) -> dict:
    """The fastest prefill and decode step (s) of `runs` generations of the block."""
    pre, dec = [], []
    for _ in range(runs):
        llm.stats = type(llm.stats)(weights_split=llm.stats.weights_split)
        llm.generate(prompts, gen_len, SamplingParams(ignore_eos=True))
        pre.append(llm.stats.prefill_s)
        dec.append(llm.stats.decode_s / max(gen_len - 1, 1))
    return {"prefill_s": min(pre), "decode_s": min(dec)}


def compare(llm: LLM, prof: HardwareProfile, prompt_len: int, gen_len: int,
            prompts: list[list[int]]) -> dict:
    """One pair: the prediction from `prof` and the best of two runs right after it."""
    elem = llm.dtype.itemsize
    pred = predict(llm.spec, llm.policy, prof, prompt_len, gen_len, num_prompts=len(prompts),
                   device=llm.device.type, dtype_bytes=elem)
    meas = best_of(llm, prompts, gen_len)
    p = {"prefill_s": pred.prefill_s, "decode_s": pred.decode_s}
    return {"predicted": p, "measured": meas,
            "ratio": {k.removesuffix("_s"): p[k] / meas[k] for k in p},
            "breakdown": pred.breakdown, "disk_cached": pred.disk_cached}


def summary(name: str, spec: tuple, pairs: list[dict]) -> dict:
    model, policy, prompt_len, gen_len = spec
    return {"name": name, "model": model, "policy": policy.to_dict(), "prompt_len": prompt_len,
            "gen_len": gen_len, "num_prompts": policy.block_size, "pairs": pairs,
            "median_ratio": {k: statistics.median(p["ratio"][k] for p in pairs)
                             for k in ("prefill", "decode")}}


def run_cpu(n_pairs: int, offload_dir: str) -> tuple[list[dict], dict]:
    """Every row in each pair, after one fresh profile of this machine."""
    llms, pairs = {}, {name: [] for name in CPU_ROWS}
    try:
        for name, (model, policy, P, G) in CPU_ROWS.items():
            llm = llms[name] = LLM(model, device="cpu", policy=policy, offload_dir=offload_dir)
            llm.generate(prompts_for(llm, policy.block_size, P), G)          # warm-up
        for i in range(n_pairs):
            start = busy_ticks()
            prof = measure("cpu", offload_dir, disk_bytes=DISK_BYTES,
                           command=f"hardware.measure('cpu', disk_bytes={DISK_BYTES})")
            for name, (model, policy, P, G) in CPU_ROWS.items():
                llm = llms[name]
                pairs[name].append(compare(llm, prof, P, G,
                                           prompts_for(llm, policy.block_size, P)))
                pairs[name][-1]["profile"] = profile_rates(prof)
            others = others_cores(start, busy_ticks())     # during the profile and the runs
            for p in pairs.values():
                p[-1]["others_cores"] = others
            for n, p in pairs.items():
                pr, me = p[-1]["predicted"], p[-1]["measured"]
                print(f"pair {i + 1}/{n_pairs} {n}: prefill {pr['prefill_s']:.4f}/"
                      f"{me['prefill_s']:.4f} s, decode step {pr['decode_s']:.4f}/"
                      f"{me['decode_s']:.4f} s predicted/measured; others "
                      f"{p[-1]['others_cores']:.2f} cores", flush=True)
    finally:
        for llm in llms.values():
            llm.close()
    source = {"profile": f"hardware.measure('cpu', offload dir, disk_bytes={DISK_BYTES}) "
                         "before each pair"}
    return [summary(n, CPU_ROWS[n], p) for n, p in pairs.items()], source


def profile_rates(prof: HardwareProfile) -> dict:
    """The profile's CPU rates a CPU prediction rests on."""
    keys = ("cpu_flops_decode", "cpu_flops_decode_small", "cpu_flops_prefill", "cpu_mem_bw",
            "cpu_attn_bw", "cpu_unit_overhead", "disk_map_cached", "disk_read_cached")
    return {k: getattr(prof, k, None) for k in keys}


def run_cuda(n_pairs: int, offload_dir: str) -> tuple[list[dict], dict]:
    """Every row against the shipped profile of the GPU present."""
    shipped = profile_path("cuda")
    path = os.environ.get("FLEXRUN_PROFILE") or (
        str(shipped.relative_to(ROOT)) if shipped.is_relative_to(ROOT) else str(shipped))
    prof = default_profile("cuda")
    rows = []
    for name, (model, policy, P, G) in CUDA_ROWS.items():
        with LLM(model, device="cuda", policy=policy, offload_dir=offload_dir) as llm:
            prompts = prompts_for(llm, policy.block_size, P)
            warm_up(llm, prompts, G)
            pairs = [compare(llm, prof, P, G, prompts) for _ in range(n_pairs)]
        rows.append(summary(name, CUDA_ROWS[name], pairs))
        print(f"{name}: decode {rows[-1]['median_ratio']['decode']:.2f}", flush=True)
        torch.cuda.empty_cache()
    return rows, {"profile": path, "profile_device": prof.device_name}


def print_table(rows: list[dict]) -> None:
    print(f"{'row':30} {'pairs':>5} {'prefill s pred/meas':>22} {'decode step s pred/meas':>24}"
          f" {'prefill ratio':>14} {'decode ratio':>13}")
    for r in rows:
        med = lambda k, w: statistics.median(p[w][k] for p in r["pairs"])  # noqa: E731
        print(f"{r['name']:30} {len(r['pairs']):>5} "
              f"{med('prefill_s', 'predicted'):>10.4f}/{med('prefill_s', 'measured'):<11.4f} "
              f"{med('decode_s', 'predicted'):>11.4f}/{med('decode_s', 'measured'):<12.4f} "
              f"{r['median_ratio']['prefill']:>14.2f} {r['median_ratio']['decode']:>13.2f}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--pairs", type=int, default=5, help="profile/run pairs (cuda: runs)")
    ap.add_argument("-o", "--output", default=None,
                    help="default: bench/results/costmodel-check-<device>.json")
    ap.add_argument("--offload-dir", default=None, help="default: a new temporary directory")
    a = ap.parse_args(argv)
    device = "cpu" if a.device == "cpu" else torch.cuda.get_device_name(0)
    res = {"check": "cost model predicted vs measured",
           "command": "python -m bench.costmodel_check " + shlex.join(
               sys.argv[1:] if argv is None else argv),
           "device": device, "date": time.strftime("%Y-%m-%d %H:%M"),
           "host_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_avg_start": os.getloadavg()}
    start = busy_ticks()
    with tempfile.TemporaryDirectory(prefix="flexrun-check-", dir=a.offload_dir) as tmp:
        rows, source = (run_cpu if a.device == "cpu" else run_cuda)(a.pairs, tmp)
    res.update(source)
    res["others_cores"] = others_cores(start, busy_ticks())
    res["load_avg_end"] = os.getloadavg()
    res["rows"] = rows
    path = Path(a.output or ROOT / "bench" / "results" /
                f"costmodel-check-{device.replace(' ', '-')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    print_table(rows)
    print(f"profile: {res['profile']}; other processes used {res['others_cores']:.2f} cores "
          "on average")
    if a.device == "cpu" and res["others_cores"] > BUSY:
        print(f"machine busy (> {BUSY} cores used by others): the measured times are unreliable")
    print("wrote", path)
    return res


if __name__ == "__main__":
    main()
