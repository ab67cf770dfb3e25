"""Accuracy of every execution path on a real model (SmolLM2-135M-Instruct by default).

python -m bench.accuracy [--device cpu|cuda] [--model smollm2|FILE.gguf|HF_DIR] \
    [--out bench/results/accuracy-<device>.json]

For each path (resident; weights / KV cache / activations on other tiers; CPU attention; 4-bit
compression) it measures
  * perplexity of tests/data's text, through flexrun's own scoring code (the function behind
    `flexrun eval-ppl`, same window / stride meaning);
  * greedy agreement with the reference resident run (same device and dtype) on a fixed set of
    prompts: the fraction of generated tokens equal position by position, the mean share of
    tokens before the first difference, and how many outputs are identical;
  * on CUDA also agreement with the resident CPU fp32 run.
Every path runs the same block shape (2 GPU batches of 4) so only the placement differs.
Prints a Markdown table and writes JSON with the settings, the device and every output.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from flexrun import LLM, Policy, SamplingParams
from flexrun.cli.eval_ppl import perplexity_terms
from flexrun.models.loader import open_checkpoint, resolve_named

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "pride_and_prejudice_ch1.txt"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "def add(a, b):\n    \"\"\"Return the sum of a and b.",
    "Water is made of",
    "The best way to learn a new language is",
    "In the year 1900, the largest city in the world was",
    "Here is a short poem about the moon:\n",
]
BLOCK = dict(gpu_batch_size=4, num_gpu_batches=2)
SPLIT = dict(weights_gpu=30, weights_cpu=40, weights_disk=30, cache_gpu=30, cache_cpu=40,
             cache_disk=30, act_gpu=30, act_cpu=40, act_disk=30)


@dataclass(frozen=True)
class Variant:
    """One execution path: Policy overrides on top of BLOCK.

    host_noop: with --device cpu the compute device *is* host memory ("gpu" = "cpu" tier), so
    this path runs exactly the resident code and is skipped unless --all-paths."""
    name: str
    overrides: dict
    host_noop: bool = False


VARIANTS = [
    Variant("weights on cpu", dict(weights_gpu=0, weights_cpu=100), host_noop=True),
    Variant("weights on disk", dict(weights_gpu=0, weights_disk=100)),
    Variant("KV cache on cpu", dict(cache_gpu=0, cache_cpu=100), host_noop=True),
    Variant("KV cache on cpu + cpu attention", dict(cache_gpu=0, cache_cpu=100,
                                                    cpu_attention=True), host_noop=True),
    Variant("KV cache on disk", dict(cache_gpu=0, cache_disk=100)),
    Variant("activations on cpu", dict(act_gpu=0, act_cpu=100), host_noop=True),
    Variant("activations on disk", dict(act_gpu=0, act_disk=100)),
    Variant("weights+KV+act 30/40/30 gpu/cpu/disk", SPLIT),
    Variant("compress weight (4-bit, g64)", dict(compress_weight=True)),
    # groups of 32 along the input dim = the GGUF's Q4_1 blocks (same min/scale scheme)
    Variant("compress weight (4-bit, g32)", dict(compress_weight=True, quant_group=32)),
    Variant("compress cache (4-bit, g64)", dict(compress_cache=True)),
    Variant("compress weight + cache", dict(compress_weight=True, compress_cache=True)),
]


@dataclass
class Job:
    model: str                      # resolved path
    ids: list[int]                  # token ids of the text
    window: int
    stride: int
    prompts: list[str]
    new_tokens: int


@dataclass
class Row:
    path: str
    device: str
    dtype: str
    policy: dict
    ppl: float
    tokens_scored: int
    agree: float                    # token agreement vs the resident run, same device + dtype
    prefix: float                   # mean share of tokens before the first difference
    identical: int                  # prompts whose whole output equals the reference
    bit_identical: bool             # same perplexity to the last bit and all outputs identical
    agree_cpu_fp32: float           # token agreement vs the resident CPU fp32 run
    seconds: float                  # load + perplexity + generation
    outputs: list[list[int]] = field(default_factory=list)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions where two sets of generated sequences hold the same token."""
    same = sum(x == y for sa, sb in zip(a, b) for x, y in zip(sa, sb))
    return same / max(sum(max(len(sa), len(sb)) for sa, sb in zip(a, b)), 1)


def common_prefix(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean over prompts of (tokens before the first difference) / output length."""
    shares = []
    for sa, sb in zip(a, b):
        n = next((i for i, (x, y) in enumerate(zip(sa, sb)) if x != y), min(len(sa), len(sb)))
        shares.append(n / max(len(sa), len(sb), 1))
    return sum(shares) / max(len(shares), 1)


def measure(job: Job, device: str, dtype: str, policy: Policy) -> tuple[float, int, list, float]:
    """(perplexity, scored tokens, greedy outputs, seconds including the load) of one path."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flexrun-acc-") as tmp:
        with LLM(job.model, device=device, policy=policy, dtype=dtype, offload_dir=tmp) as llm:
            nll, count = perplexity_terms(llm, job.ids, job.window, job.stride)
            outs = llm.generate(job.prompts, job.new_tokens, SamplingParams(ignore_eos=True))
    return math.exp(nll / count), count, [o.output_ids for o in outs], time.perf_counter() - t0


def run_path(job: Job, name: str, device: str, dtype: str, overrides: dict,
             ref: Row | None, cpu_ref: Row | None) -> Row:
    policy = Policy(**{**BLOCK, **overrides})
    ppl, count, outs, secs = measure(job, device, dtype, policy)
    ref_outs = ref.outputs if ref else outs
    same = sum(a == b for a, b in zip(outs, ref_outs))
    row = Row(name, device, dtype, policy.to_dict(), ppl, count, agreement(outs, ref_outs),
              common_prefix(outs, ref_outs), same,
              (ppl == ref.ppl if ref else True) and same == len(outs),
              agreement(outs, cpu_ref.outputs if cpu_ref else outs), secs, outs)
    print(f"  {device} {dtype:4s} {name:38s} ppl {ppl:9.5f}  agree {row.agree:6.1%}  "
          f"({secs:.1f} s)", file=sys.stderr, flush=True)
    return row


def run_all(job: Job, device: str, dtypes: list[str], all_paths: bool
            ) -> tuple[list[Row], list[str]]:
    """CPU fp32 resident first (the common reference), on CUDA fp16 and bf16 resident, then
    every variant per dtype against the resident run of its device and dtype.
    Returns the rows and the names of the variants skipped (host_noop on a CPU device)."""
    cpu_ref = run_path(job, "resident", "cpu", "fp32", {}, None, None)
    rows, refs = [cpu_ref], {("cpu", "fp32"): cpu_ref}
    resident = list(dict.fromkeys((["fp16", "bf16"] if device == "cuda" else []) + dtypes))
    for dt in resident:
        if (device, dt) not in refs:
            refs[(device, dt)] = run_path(job, "resident", device, dt, {}, None, cpu_ref)
            rows.append(refs[(device, dt)])
    skipped = [v.name for v in VARIANTS if v.host_noop and device == "cpu" and not all_paths]
    for dt in dtypes:
        for v in VARIANTS:
            if v.name not in skipped:
                rows.append(run_path(job, v.name, device, dt, v.overrides, refs[(device, dt)],
                                     cpu_ref))
    return rows, skipped


def markdown(rows: list[Row], header: str, skipped: list[str]) -> str:
    gpu = any(r.device != "cpu" for r in rows)
    refs = {(r.device, r.dtype): r for r in rows if r.path == "resident"}
    out = [header, "",
           "| path | device | dtype | perplexity | Δ ppl vs resident | token agreement | "
           "tokens before 1st diff | identical outputs | bit-identical |"
           + (" agreement vs CPU fp32 |" if gpu else ""),
           "|---|---|---|---:|---:|---:|---:|---:|---|" + ("---:|" if gpu else "")]
    for r in rows:
        d = r.ppl / refs[(r.device, r.dtype)].ppl - 1
        out.append(f"| {r.path} | {r.device} | {r.dtype} | {r.ppl:.4f} | {d:+.3%} | "
                   f"{r.agree:.1%} | {r.prefix:.1%} | {r.identical}/{len(r.outputs)} | "
                   f"{'yes' if r.bit_identical else 'no'} |"
                   + (f" {r.agree_cpu_fp32:.1%} |" if gpu else ""))
    inert = [r.path for r in rows if _inert_cache_compression(r, rows)]
    if inert:
        out += ["", "compress_cache changed nothing in: " + "; ".join(inert) + " (bit-identical "
                "to the same policy without it): this engine does not compress the KV cache; "
                "the flag only enters the cost model and the memory estimate."]
    if skipped:
        out += ["", "Not run on a CPU-only device (the compute device is host memory, so these "
                "run exactly the resident code; `--all-paths` runs them): " + "; ".join(skipped)
                + "."]
    return "\n".join(out)


def _inert_cache_compression(r: Row, rows: list[Row]) -> bool:
    """r has compress_cache on and equals, bit for bit, the row of the same policy without it."""
    if not r.policy["compress_cache"]:
        return False
    base = {**r.policy, "compress_cache": False}
    return any(o.policy == base and (o.device, o.dtype) == (r.device, r.dtype)
               and o.ppl == r.ppl and o.outputs == r.outputs for o in rows)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    n = torch.get_num_threads()
    return f"cpu ({platform.processor() or platform.machine()}, {n} thread{'s' * (n != 1)})"


def _shown(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _compact(text: str) -> str:
    """Put indented JSON lists of numbers (token ids) on one line."""
    return re.sub(r"\[\s+(-?[\d.e+-]+(?:,\s+-?[\d.e+-]+)*)\s+\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", default="smollm2", help="smollm2 (default), a .gguf or an HF dir")
    ap.add_argument("--dtypes", default=None,
                    help="dtypes of the offload paths, comma-separated (default fp32 on cpu, "
                         "fp16 on cuda); on cuda fp16 and bf16 resident always run")
    ap.add_argument("--text", default=str(TEXT))
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--stride", type=int, default=256,
                    help="default 256 = window: every token scored once, no overlap (half the "
                         "compute of eval-ppl's default stride 128)")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 with --device cpu: on a shared 2-core "
                         "machine two threads can be several times slower; 0 = torch default)")
    ap.add_argument("--all-paths", action="store_true",
                    help="on cpu also run the paths that are the resident code there")
    ap.add_argument("--out", default=None,
                    help="JSON path (default bench/results/accuracy-<device>.json)")
    a = ap.parse_args(argv)
    if not 1 <= a.prompts <= len(PROMPTS):
        ap.error(f"--prompts must be 1..{len(PROMPTS)}")
    if a.window < 2 or not 1 <= a.stride <= a.window or a.new_tokens < 1:
        ap.error("need --window >= 2, 1 <= --stride <= --window and --new-tokens >= 1")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.accuracy: --device cuda but no CUDA GPU is visible")
    threads = a.threads if a.threads is not None else (1 if a.device == "cpu" else 0)
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    shown = sys.argv[1:] if argv is None else argv
    try:
        _run(a, " ".join(["python -m bench.accuracy", *shown]))
    finally:
        torch.set_num_threads(before)


def _run(a: argparse.Namespace, command: str) -> None:
    dtypes = (a.dtypes or ("fp16" if a.device == "cuda" else "fp32")).split(",")
    model = resolve_named(a.model)
    ckpt = open_checkpoint(model)
    ids = ckpt.tokenizer.encode(Path(a.text).read_text(encoding="utf-8")).ids
    job = Job(model, ids, a.window, a.stride, PROMPTS[:a.prompts], a.new_tokens)
    t0 = time.perf_counter()
    rows, skipped = run_all(job, a.device, dtypes, a.all_paths)
    total = time.perf_counter() - t0
    header = (f"`{command}` on {device_name(a.device)}, torch {torch.__version__}, "
              f"{total:.0f} s. Model {ckpt.spec.name or a.model}. Perplexity: "
              f"{_shown(a.text)}, {len(ids)} tokens, window {a.window}, stride {a.stride}. "
              f"Greedy: {len(job.prompts)} prompts x {a.new_tokens} new tokens (EOS ignored), "
              f"block {BLOCK['gpu_batch_size']}x{BLOCK['num_gpu_batches']}.")
    table = markdown(rows, header, skipped)
    print(table)
    out = Path(a.out or ROOT / "bench" / "results" / f"accuracy-{a.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_compact(json.dumps({
        "command": command, "device": device_name(a.device), "torch": torch.__version__,
        "model": a.model, "model_file": Path(model).name, "text": _shown(a.text),
        "text_tokens": len(ids), "window": a.window, "stride": a.stride,
        "prompts": job.prompts, "new_tokens": a.new_tokens, "block": BLOCK,
        "total_s": round(total, 1), "skipped": skipped,
        "rows": [asdict(r) for r in rows], "table": table}, indent=1)) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
