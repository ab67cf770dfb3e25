"""Benchmark scenarios: flexrun and its peers on the same shape, lengths and budget, one run.

python -m bench.run S1 [--skip-peers] [--only flexrun,flexgen]
Each system runs in its own subprocess (they cannot share the host's memory); results go to
bench/results/<scenario>-<device>.json and a row in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLEXGEN_PAPER = ["--percent", "20", "80", "0", "100", "0", "100", "--gpu-batch-size", "32",
                 "--num-gpu-batches", "2", "--cpu-cache-compute"]

SCENARIOS = {
    "S1": {"what": "OPT-30B, 16 GiB GPU budget, FlexGen's paper policy (20/80 weights, CPU KV, "
                   "CPU attention, 32x2)",
           "flexrun": ["--model", "dummy:opt-30b", "--policy",
                       "policies/opt-30b-flexgen-paper.json", "--gpu-mem", "16GiB",
                       "--cpu-mem", "100GiB", "--num-prompts", "64"],
           "flexgen": ["--model", "opt-30b"] + FLEXGEN_PAPER,
           "floor": "pcie"},
    "S1-auto": {"what": "OPT-30B, 16 GiB GPU / 100 GiB CPU, policy chosen by flexrun's search",
                "flexrun": ["--model", "dummy:opt-30b", "--policy", "auto", "--gpu-mem", "16GiB",
                            "--cpu-mem", "100GiB"],
                "floor": "pcie"},
    "S2": {"what": "OPT-30B, 4-bit weights all on GPU, batch 32",
           "flexrun": ["--model", "dummy:opt-30b", "--policy", "policies/opt-6.7b-gpu-b32.json",
                       "--compress-weight", "--num-prompts", "32"],
           "flexgen": ["--model", "opt-30b", "--percent", "100", "0", "100", "0", "100", "0",
                       "--gpu-batch-size", "32", "--num-gpu-batches", "1", "--compress-weight"]},
    "S3": {"what": "OPT-6.7B all on GPU, batch 32",
           "flexrun": ["--model", "dummy:opt-6.7b", "--policy", "policies/opt-6.7b-gpu-b32.json",
                       "--num-prompts", "32"],
           "flexgen": ["--model", "opt-6.7b", "--percent", "100", "0", "100", "0", "100", "0",
                       "--gpu-batch-size", "32", "--num-gpu-batches", "1"],
           "floor": "hbm"},
}


def _run(cmd: list[str], tag: str, log: Path, timeout: int) -> dict:
    t0 = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    log.write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    for line in p.stdout.splitlines():
        if line.startswith(tag + " "):
            r = json.loads(line[len(tag) + 1:])
            r["wall_s"] = time.time() - t0
            return r
    return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1], "rc": p.returncode}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--only", default="flexrun,flexgen")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--timeout", type=int, default=540)
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    sc = SCENARIOS[a.scenario]
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lens = ["--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len)]
    only = a.only.split(",")
    res = {"scenario": a.scenario, "what": sc["what"], "prompt_len": a.prompt_len,
           "gen_len": a.gen_len, "command": "python -m bench.run " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    if "flexrun" in only:
        res["flexrun"] = _run([sys.executable, "-m", "bench.run_flexrun", *sc["flexrun"], *lens],
                              "FLEXRUN_RESULT", out_dir / f"{a.scenario}-flexrun.log", a.timeout)
        print("flexrun", json.dumps(res["flexrun"]), flush=True)
    if "flexgen" in only and "flexgen" in sc:
        res["flexgen"] = _run([sys.executable, "-m", "bench.peers.flexgen_peer", *sc["flexgen"],
                               *lens], "FLEXGEN_RESULT", out_dir / f"{a.scenario}-flexgen.log",
                              a.timeout)
        print("flexgen", json.dumps(res["flexgen"]), flush=True)
    fr, fg = res.get("flexrun", {}), res.get("flexgen", {})
    if "total_tok_s" in fr and "total_tok_s" in fg:
        res["ratio_total_vs_flexgen"] = fr["total_tok_s"] / fg["total_tok_s"]
        res["ratio_decode_vs_flexgen"] = fr["decode_tok_s"] / fg["decode_tok_s"]
    device = (fr.get("device") or "unknown").replace(" ", "-")
    path = out_dir / f"{a.scenario}-{device}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"{'system':10} {'prefill s':>10} {'decode s':>10} {'total tok/s':>12} {'peak GPU GB':>12}")
    for name in ("flexrun", "flexgen"):
        r = res.get(name, {})
        if "total_tok_s" in r:
            print(f"{name:10} {r['prefill_s']:10.2f} {r['decode_s']:10.2f} {r['total_tok_s']:12.2f}"
                  f" {r.get('peak_gpu_GB', 0):12.2f}")
    if "ratio_total_vs_flexgen" in res:
        print(f"flexrun / FlexGen total: {res['ratio_total_vs_flexgen']:.2f}x")
    print("wrote", path)


if __name__ == "__main__":
    main()
