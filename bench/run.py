"""Benchmark scenarios: flexrun and its peers on the same shape, lengths and budget, one run.

python -m bench.run S1 [--only flexrun,flexgen,accelerate] [--note "..."]
Each system runs in its own subprocess (they cannot share the host's memory); results go to
bench/results/<scenario>-<device>.json and a row in docs/benchmarks.md. A scenario may fix its
own prompt / gen lengths (S4: CPU-only); every system of one run gets the same lengths.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from bench.system_proc import gpu_name, gpu_processes, run_system


ROOT = Path(__file__).resolve().parents[1]
FLEXGEN_PAPER = ["--percent", "20", "80", "0", "100", "0", "100", "--gpu-batch-size", "32",
                 "--num-gpu-batches", "2", "--cpu-cache-compute"]

SCENARIOS = {
    "S1": {"what": "OPT-30B, 16 GiB GPU budget, FlexGen's paper policy (20/80 weights, CPU KV, "
                   "CPU attention, 32x2)",
           "flexrun": ["--model", "dummy:opt-30b", "--policy",
                       "policies/opt-30b-flexgen-paper.json", "--gpu-mem", "16GiB",
                       "--cpu-mem", "100GiB", "--num-prompts", "64"],
           # the same budget with the policy flexrun's search picks (issue: cost model)
           "flexrun-auto": ["--model", "dummy:opt-30b", "--policy", "auto", "--gpu-mem", "16GiB",
                            "--cpu-mem", "100GiB", "--num-prompts", "64"],
           "flexgen": ["--model", "opt-30b"] + FLEXGEN_PAPER,
           # Accelerate: 8 layers fit 16 GiB, the rest runs from CPU (one batch of 8 is its
           # steady state: every forward copies the CPU layers to the GPU again)
           "accelerate": ["--model", "opt-30b", "--device", "cuda", "--gpu-mem", "16GiB",
                          "--cpu-mem", "100GiB", "--batch-size", "8", "--num-prompts", "8"],
           # DeepSpeed ZeRO-Inference: ZeRO-3, weights in pinned CPU memory, the largest batch
           # whose KV cache fits 16 GiB (17); every step streams all weights, so 8 decode
           # steps are timed and decode extrapolated (the result says so)
           "deepspeed": ["--model", "opt-30b", "--gpu-mem", "16GiB", "--batch-size", "auto",
                         "--cut-gen-len", "8"],
           "deepspeed-compressed": ["--model", "opt-30b", "--gpu-mem", "16GiB", "--batch-size",
                                    "auto", "--cut-gen-len", "8", "--quant-bits", "4"],
           "floor": "pcie"},
    "S2": {"what": "OPT-30B, 4-bit weights all on GPU, batch 32",
           "flexrun": ["--model", "dummy:opt-30b", "--policy", "policies/opt-6.7b-gpu-b32.json",
                       "--compress-weight", "--num-prompts", "32"],
           "flexgen": ["--model", "opt-30b", "--percent", "100", "0", "100", "0", "100", "0",
                       "--gpu-batch-size", "32", "--num-gpu-batches", "1", "--compress-weight"]},
    "S2-16GiB": {"what": "OPT-30B, 4-bit weights, 16 GiB GPU / 100 GiB CPU, policy chosen by "
                         "flexrun's search (FlexGen: its paper placement with --compress-weight)",
                 "flexrun": ["--model", "dummy:opt-30b", "--policy", "auto", "--compress-weight",
                             "--gpu-mem", "16GiB", "--cpu-mem", "100GiB", "--num-prompts", "64"],
                 "flexgen": ["--model", "opt-30b"] + FLEXGEN_PAPER + ["--compress-weight"],
                 "floor": "pcie"},
    "S3": {"what": "OPT-6.7B all on GPU, batch 32",
           "flexrun": ["--model", "dummy:opt-6.7b", "--policy", "policies/opt-6.7b-gpu-b32.json",
                       "--num-prompts", "32"],
           "flexgen": ["--model", "opt-6.7b", "--percent", "100", "0", "100", "0", "100", "0",
                       "--gpu-batch-size", "32", "--num-gpu-batches", "1"],
           "floor": "hbm"},
    # S3b: the batch is the search's (no --num-prompts: one block of the searched size)
    "S3b": {"what": "OPT-6.7B, 80 GiB GPU budget (capped at 90% of the device), policy and "
                    "batch chosen by flexrun's search; against the floor",
            "flexrun-auto": ["--model", "dummy:opt-6.7b", "--policy", "auto", "--gpu-mem",
                             "80GiB", "--cpu-mem", "100GiB"],
            "floor": "hbm"},
    "S5": {"what": "Llama-70B (GQA), 4-bit weights, whole H100 / 100 GiB CPU, policy chosen by "
                   "flexrun's search; no peer runs it here: against the floor",
           "flexrun-auto": ["--model", "dummy:llama-70b", "--policy", "auto", "--compress-weight",
                            "--cpu-mem", "100GiB"],
           "floor": "hbm"},
    "S1-qwen3": {"what": "Qwen3-32B (q/k norms, GQA 64/8), 16 GiB GPU / 100 GiB CPU, policy "
                         "chosen by flexrun's search; no peer runs Qwen3: against the floor",
           "flexrun-auto": ["--model", "dummy:qwen3-32b", "--policy", "auto", "--gpu-mem",
                            "16GiB", "--cpu-mem", "100GiB", "--num-prompts", "64"],
           "floor": "pcie"},
    # S4 is shrunk (prompt 128, 16 prompts; gen 32 as the other scenarios) so that both
    # systems finish in < 10 min on 2 cores: run_flexrun's warm-up repeats the block's
    # prefill (earlier runs used gen 16: history in docs/benchmarks.md). 1.5 GiB, not 1 GiB: flexrun
    # needs >= 1.21 GiB (1.27 GiB planning for 512 + 32) with the smallest block; the model
    # (4.9 GiB fp32) is still > 3x the budget. flexrun's budget covers weights, KV and
    # activations; Accelerate's max_memory covers its weights only (KV and activations on top).
    "S4": {"what": "CPU only (2 cores): OPT-1.3B fp32 (4.9 GiB), 1.5 GiB CPU budget, weights "
                   "streamed from disk; vs Accelerate's disk offload (batch 8)",
           "flexrun": ["--model", "dummy:opt-1.3b", "--device", "cpu", "--cpu-mem", "1.5GiB",
                       "--policy", "auto", "--num-prompts", "16"],
           "accelerate": ["--model", "opt-1.3b", "--device", "cpu", "--cpu-mem", "1.5GiB",
                          "--batch-size", "8", "--num-prompts", "8"],
           # the same 16 prompts as flexrun in one batch: faster than batch 8 (bf16 3.55 vs
           # 2.89 tok/s), with its KV and activations further above the budget
           "accelerate-b16": ["--model", "opt-1.3b", "--device", "cpu", "--cpu-mem", "1.5GiB",
                              "--batch-size", "16", "--num-prompts", "16"],
           "prompt_len": 128, "gen_len": 32},
}
# S1c: S1's budget with compression allowed on both sides (FlexGen: its paper placement)
SCENARIOS["S1c"] = {
    "what": "OPT-30B, 4-bit weights and KV cache, 16 GiB GPU / 100 GiB CPU; flexrun's searched "
            "policy vs FlexGen's paper placement with --compress-weight --compress-cache",
    "flexrun-auto": SCENARIOS["S1"]["flexrun-auto"] + ["--compress-weight", "--compress-cache"],
    "flexgen": SCENARIOS["S1"]["flexgen"] + ["--compress-weight", "--compress-cache"],
    "floor": "pcie"}
# S1-kv4: S1's budget and search with the 4-bit KV cache alone (issue 25's speed line)
SCENARIOS["S1-kv4"] = {
    "what": "OPT-30B, 4-bit KV cache, 16 GiB GPU / 100 GiB CPU, policy chosen by flexrun's search",
    "flexrun-auto": SCENARIOS["S1"]["flexrun-auto"] + ["--compress-cache"], "floor": "pcie"}
# S1-ahead: S1's searched shape (64x1) with one and two streamed units' weights loading ahead
# (Policy.weights_ahead), each with the most GPU cache its footprint fits in 16 GiB: whether the
# device-cache layers' copies take the slack of the CPU-attention layers (costmodel.md, gaps)
SCENARIOS["S1-ahead"] = {
    "what": "OPT-30B, 16 GiB GPU / 100 GiB CPU, 64x1, weights streamed, CPU attention; one or "
            "two units' weights loading ahead",
    **{f"flexrun-ahead{a}": ["--model", "dummy:opt-30b", "--policy",
                             f"policies/opt-30b-64x1-ahead{a}.json", "--gpu-mem", "16GiB",
                             "--cpu-mem", "100GiB", "--num-prompts", "64"] for a in (1, 2)},
    "deepspeed": SCENARIOS["S1"]["deepspeed"], "floor": "pcie"}
# S4 with both systems in bfloat16 (CPUs with AVX512-BF16 / AMX run bf16 GEMMs ~3x faster
# than fp32: 385 vs 125 GFLOP/s at 1024 x 2048 x 8192 on the 2-core CI machine)
SCENARIOS["S4-bf16"] = {
    "what": "S4 with both systems in bfloat16 (weights 2.5 GiB, 1.5 GiB CPU budget)",
    **{k: SCENARIOS["S4"][k] + ["--dtype", "bfloat16"]
       for k in ("flexrun", "accelerate", "accelerate-b16")},
    "prompt_len": 128, "gen_len": 32}
# S6's Accelerate rows (merged into S6 wherever it is defined): transformers' Mixtral at batch
# 4 / 8 / 16, the best one stands for Accelerate; ~10 s per forward at this size, so it runs 3
# decode steps and extrapolates its decode time to the full gen length (the result says so)
_S6_ACCEL = ["--model", "mixtral-8x7b", "--device", "cuda", "--gpu-mem", "24GiB",
             "--cpu-mem", "100GiB", "--cut-gen-len", "3"]
# mixture of experts: flexrun's search picks batch, blocks and placement; routed experts off the
# GPU move once per block and layer (copy lane) or compute on the host (CPU lane); dummy routers
# draw experts uniformly (FLEXRUN_DUMMY_ROUTING), the result records experts touched per call
# S6 and S7 run 256 prompts (one job's size; the unbounded search picks 384 / 1024)
SCENARIOS["S6"] = {
    "what": "Mixtral-8x7B fp16, prompt 512, gen 32, 256 prompts, 24 GiB GPU, 100 GiB CPU (disk "
            "allowed); policy chosen by flexrun's search",
    "flexrun-auto": ["--model", "dummy:mixtral-8x7b", "--policy", "auto", "--gpu-mem", "24GiB",
                     "--cpu-mem", "100GiB", "--num-prompts", "256"],
    "floor": "pcie"}
# S6q: 256 prompts in a block of the search's choosing (64 x 4 with h100-measured.json and its
# measured layer calls: predicted decode 669 tok/s, 474 measured); unbounded it picks ~1500
# prompts, whose 256 steps take ~6 min
SCENARIOS["S6q"] = {
    "what": "Mixtral-8x7B, 4-bit weights and KV cache, prompt 512, gen 256, 256 prompts, 24 GiB "
            "GPU, 100 GiB CPU; policy chosen by flexrun's search",
    "flexrun-auto": SCENARIOS["S6"]["flexrun-auto"] + ["--compress-weight", "--compress-cache"],
    # fewer, larger GPU batches (each layer call's host launches weigh less)
    "flexrun-128x2": ["--model", "dummy:mixtral-8x7b", "--policy",
                      "policies/mixtral-8x7b-w4kv4-128x2.json", "--gpu-mem", "24GiB",
                      "--cpu-mem", "100GiB", "--num-prompts", "256"],
    "prompt_len": 512, "gen_len": 256, "floor": "pcie"}
SCENARIOS["S7"] = {
    "what": "Qwen3-30B-A3B (128 experts, top-8), prompt 512, gen 32, 256 prompts, 16 GiB GPU, "
            "100 GiB CPU, uniform routing; policy chosen by flexrun's search",
    "flexrun-auto": ["--model", "dummy:qwen3-30b-a3b", "--policy", "auto", "--gpu-mem", "16GiB",
                     "--cpu-mem", "100GiB", "--num-prompts", "256"],
    # the policy the search picks for this budget at gen 3 on the H100 (64 x 4, 17% of the
    # weights on the GPU, KV cache and attention on the CPU), fixed
    "flexrun": ["--model", "dummy:qwen3-30b-a3b", "--policy", "policies/qwen3-30b-a3b-64x4.json",
                "--gpu-mem", "16GiB", "--cpu-mem", "100GiB", "--num-prompts", "256"],
    # the peer as for S6: transformers' Qwen3-MoE under Accelerate, 3 decode steps extrapolated
    **{f"accelerate{sfx}": ["--model", "qwen3-30b-a3b", "--device", "cuda", "--gpu-mem", "16GiB",
                            "--cpu-mem", "100GiB", "--cut-gen-len", "3", "--batch-size", b]
       for sfx, b in (("", "4"), ("-b8", "8"), ("-b16", "16"))},
    "floor": "pcie"}
SCENARIOS["S6"].update({f"accelerate{sfx}": _S6_ACCEL + ["--batch-size", b]
                              for sfx, b in (("", "4"), ("-b8", "8"), ("-b16", "16"))})
# S8: AirLLM (layer by layer from disk) against flexrun on one safetensors checkpoint of
# flexrun's synthetic weights ("prepare" writes it once; AirLLM's split links its shards); both
# start from disk (page cache dropped before each system); AirLLM's process is capped at 4 GiB
# and keeps the largest batch that fits; 4 decode steps timed, decode extrapolated
_CKPT = os.environ.get("FLEXRUN_PEER_CKPT", "/tmp/flexrun-peer-ckpt")
for _sc, _preset in (("S8-airllm", "llama3-8b"), ("S8-airllm-13b", "llama-13b")):
    SCENARIOS[_sc] = {
        "what": f"{_preset} shape, one fp16 safetensors checkpoint on disk, 4 GiB GPU, 100 GiB "
                "CPU, page cache dropped before each system",
        "prepare": ["-m", "bench.peers.airllm_peer", "--model", _preset, "--write-only"],
        "drop_caches": True,
        "flexrun": ["--model", f"{_CKPT}/{_preset}", "--policy", "auto", "--gpu-mem", "4GiB",
                    "--cpu-mem", "100GiB"],
        "airllm": ["--model", _preset, "--gpu-mem", "4GiB", "--cpu-mem", "100GiB",
                   "--cut-gen-len", "4"]}
from bench.headline import HEADLINE_SCENARIOS  # noqa: E402  (FlexGen paper's table: H-opt-*)
SCENARIOS.update(HEADLINE_SCENARIOS)
SYSTEMS = {"flexrun": ("bench.run_flexrun", "FLEXRUN_RESULT"),
           "flexrun-auto": ("bench.run_flexrun", "FLEXRUN_RESULT"),
           "flexgen": ("bench.peers.flexgen_peer", "FLEXGEN_RESULT"),
           "accelerate": ("bench.peers.accelerate_peer", "ACCELERATE_RESULT"),
           "accelerate-b8": ("bench.peers.accelerate_peer", "ACCELERATE_RESULT"),
           "accelerate-b16": ("bench.peers.accelerate_peer", "ACCELERATE_RESULT"),
           "accelerate-b2": ("bench.peers.accelerate_peer", "ACCELERATE_RESULT"),
           "flexgen-compressed": ("bench.peers.flexgen_peer", "FLEXGEN_RESULT"),
           "flexrun-compressed": ("bench.run_flexrun", "FLEXRUN_RESULT"),
           "flexrun-ahead1": ("bench.run_flexrun", "FLEXRUN_RESULT"),
           "flexrun-ahead2": ("bench.run_flexrun", "FLEXRUN_RESULT"),
           "flexrun-128x2": ("bench.run_flexrun", "FLEXRUN_RESULT"),
           "deepspeed": ("bench.peers.deepspeed_peer", "DEEPSPEED_RESULT"),
           "deepspeed-compressed": ("bench.peers.deepspeed_peer", "DEEPSPEED_RESULT"),
           "airllm": ("bench.peers.airllm_peer", "AIRLLM_RESULT")}


def _stop_on_term(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _tracks(trace: Path) -> list[dict]:
    """Each step's busy time per track of a flexrun trace (bench.overlap_report); the trace
    is kept gzipped beside the result."""
    import gzip
    import shutil
    from bench.overlap_report import track_busy
    rows = track_busy(str(trace))
    with open(trace, "rb") as f, gzip.open(f"{trace}.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    trace.unlink()
    return rows


def main() -> None:
    signal.signal(signal.SIGTERM, _stop_on_term)    # `timeout` stops the systems too
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--only", default=",".join(SYSTEMS), help="systems to run (those the "
                    "scenario defines)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default: the scenario's or 512")
    ap.add_argument("--gen-len", type=int, default=None, help="default: the scenario's or 32")
    ap.add_argument("--timeout", type=int, default=540)
    ap.add_argument("--note", default=None, help="stored in the result (e.g. 'machine under load')")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--trace", action="store_true", help="flexrun systems record a trace "
                    "(<out-dir>/<scenario>-<system>.trace.json.gz; CUDA events per span, a few "
                    "ms per step) and the result gets each step's busy time per track")
    ap.add_argument("--merge", action="store_true", help="keep the systems of the existing "
                    "result file that this run does not run (systems run back to back)")
    a = ap.parse_args()
    sc = SCENARIOS[a.scenario]
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plen = a.prompt_len or sc.get("prompt_len", 512)
    glen = a.gen_len or sc.get("gen_len", 32)
    lens = ["--prompt-len", str(plen), "--gen-len", str(glen)]
    only = [s for s in a.only.split(",") if s in sc and s in SYSTEMS]
    res = {"scenario": a.scenario, "what": sc["what"], "prompt_len": plen, "gen_len": glen,
           "command": "python -m bench.run " + shlex.join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M"), "host_cpus": os.cpu_count(),
           "load_avg_start": os.getloadavg()}
    others = gpu_processes()
    if others:                  # a stray run on the GPU skews every figure of this one
        res["gpu_processes_start"] = others
        print(f"warning: processes on the GPU before the run: {others}", flush=True)
    if a.note:
        res["note"] = a.note
    t0 = time.time()
    if only and sc.get("prepare"):           # e.g. a checkpoint both systems read
        res["prepare"] = run_system([sys.executable, *sc["prepare"]], "AIRLLM_RESULT",
                                    out_dir / f"{a.scenario}-prepare.log", a.timeout, ROOT)
    for name in only:
        module, tag = SYSTEMS[name]
        if sc.get("drop_caches"):
            from bench.peers.airllm_peer import drop_page_cache
            res.setdefault("page_cache", {})[name] = drop_page_cache()
        trace = out_dir / f"{a.scenario}-{name}.trace.json"
        traced = ["--trace", str(trace)] if a.trace and name.startswith("flexrun") else []
        res[name] = run_system([sys.executable, "-m", module, *sc[name], *lens, *traced],
                               tag, out_dir / f"{a.scenario}-{name}.log", a.timeout, ROOT)
        if traced and trace.is_file():
            res[name]["tracks"] = _tracks(trace)
        if name.startswith("flexrun") and "total_tok_s" in res[name]:
            from bench.floor import floor_of_result
            res[name]["floor"] = floor_of_result(res[name])
        print(name, json.dumps(res[name]), flush=True)
    res["scenario_wall_s"] = time.time() - t0
    res["load_avg_end"] = os.getloadavg()             # 1/5/15-min: others' load skews timings
    device = next((r["device"] for r in map(res.get, only) if r and r.get("device")), None)
    device = device or gpu_name()
    path = out_dir / f"{a.scenario}-{device.replace(' ', '-')}.json"
    if a.merge and path.is_file():           # earlier systems of this scenario, back to back
        old = json.loads(path.read_text())
        kept = [k for k in old if k in sc and k in SYSTEMS and k not in only]
        res.update({k: {**old[k], "merged_from": old.get("date")} for k in kept})
        res.update({k: v for k, v in old.items() if k not in res and k not in SYSTEMS
                    and not k.startswith("ratio") and k != "accelerate_best"})
        only = only + kept
    accel = [k for k in only if k.startswith("accelerate") and "total_tok_s" in res[k]]
    if accel:                                         # its best batch size stands for it
        res["accelerate_best"] = max(accel, key=lambda k: res[k]["total_tok_s"])
    for ours, suffix in (("flexrun", ""), ("flexrun-auto", "_auto"),
                         ("flexrun-compressed", "_compressed")):
        fr = res.get(ours, {})
        for peer in ("flexgen", "accelerate", "accelerate-b8", "accelerate-b16",
                     "accelerate-best", "deepspeed", "deepspeed-compressed", "airllm",
                     "flexgen-compressed"):
            p = res.get(res.get("accelerate_best") if peer == "accelerate-best" else peer) or {}
            if "total_tok_s" in fr and "total_tok_s" in p:
                res[f"ratio{suffix}_total_vs_{peer}"] = fr["total_tok_s"] / p["total_tok_s"]
                res[f"ratio{suffix}_decode_vs_{peer}"] = fr["decode_tok_s"] / p["decode_tok_s"]
    path.write_text(json.dumps(res, indent=1))
    print(f"{a.scenario}: prompt {plen}, gen {glen}, {res['scenario_wall_s']:.0f} s in all")
    print(f"{'system':12} {'prompts':>7} {'prefill s':>10} {'decode s':>10} {'total tok/s':>12}"
          f" {'decode tok/s':>12} {'peak GPU GB':>12} {'peak RSS GB':>12}"
          f" {'prefill s pred/meas':>20} {'decode step s pred/meas':>24} {'step/floor':>16}")
    for name in only:
        r = res[name]
        if "total_tok_s" in r:
            pred = r.get("predicted") or {}
            pp = (f"{pred['prefill_s']:.2f}/{r['prefill_s']:.2f}" if "prefill_s" in pred
                  else "-")
            pd = (f"{pred['decode_s']:.3f}/{r['decode_step_s']:.3f}" if "decode_s" in pred
                  and "decode_step_s" in r else "-")
            fl = r.get("floor") or {}
            pf = (f"{fl['measured_over_floor']:.2f}x {fl['bound']}" if "measured_over_floor"
                  in fl else "-")
            print(f"{name:12} {r.get('num_prompts', ''):>7} {r['prefill_s']:10.2f} "
                  f"{r['decode_s']:10.2f} {r['total_tok_s']:12.2f} {r['decode_tok_s']:12.2f} "
                  f"{r.get('peak_gpu_GB', 0):12.2f} {r.get('peak_rss_GB', 0):12.2f} {pp:>20} "
                  f"{pd:>24} {pf:>16}")
        else:
            print(f"{name:12} failed: {r.get('error')}")
    for name in only:       # flexrun's peaks as its budget check counts them
        b = res[name].get("peaks_vs_budgets") or {}
        parts = [f"{w} {b[w + '_peak_GB']:.2f} of {b[w + '_budget_GB']:.2f} GB"
                 f"{'' if b[w + '_within'] else ' (over)'}" for w in ("gpu", "cpu")
                 if w + "_peak_GB" in b]
        if parts:
            print(f"{name} peaks vs budgets: " + ", ".join(parts))
    for key in sorted(k for k in res if k.startswith("ratio") and "_total_vs_" in k):
        ours = ("flexrun-auto" if key.startswith("ratio_auto") else "flexrun-compressed"
                if key.startswith("ratio_compressed") else "flexrun")
        peer = key.rsplit("_vs_", 1)[1]
        print(f"{ours} / {peer}: total {res[key]:.2f}x, "
              f"decode {res[key.replace('_total_', '_decode_')]:.2f}x")
    print("wrote", path)


if __name__ == "__main__":
    main()
