"""Accuracy of every execution path on a real model (SmolLM2-135M-Instruct by default).

python -m bench.accuracy [--device cpu|cuda] [--model smollm2|FILE.gguf|HF_DIR] \
    [--out bench/results/accuracy-<device>.json]

For each path (resident; weights / KV cache / activations on other tiers; CPU attention; 4-bit
compression by each scheme) it measures
  * perplexity of tests/data's text, through flexrun's own scoring code (the functions behind
    `flexrun eval-ppl [--decode]`, same window / stride meaning), twice: from prefill logits,
    and through decode steps (teacher forcing after a prefill of 32 tokens, windows of the same
    length with stride window - prefill), where every scored token reads the KV cache;
  * greedy agreement with the reference resident run (same device and dtype) on prompts cut
    from the same text (224 tokens each, 32 new): the fraction of generated tokens equal
    position by position, the mean share of tokens before the first difference, and how many
    outputs are identical;
  * on CUDA also agreement with the resident CPU fp32 run;
  * the seconds the 4-bit weight search took at load (a temporary cache: the first load of a
    scheme searches, later loads read its cache).
Every path runs the same block shape (2 GPU batches of 4) so only the placement differs.
Prints a Markdown table and writes JSON with the settings, the device and every output.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from flexrun import LLM, Policy, SamplingParams
from flexrun.cli.eval_ppl import decode_terms, perplexity_terms
from flexrun.models.loader import open_checkpoint, resolve_named

from bench.accuracy_paths import SPLIT, VARIANTS, Variant  # noqa: F401  (re-exported)

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "pride_and_prejudice_ch1.txt"
BLOCK = dict(gpu_batch_size=4, num_gpu_batches=2)


@dataclass
class Job:
    model: str                      # resolved path
    ids: list[int]                  # token ids of the text
    window: int
    stride: int
    prompts: list[list[int]]        # token ids
    new_tokens: int
    prefill: int = 32               # decode-path score: tokens prefilled per window


@dataclass
class Row:
    path: str
    device: str
    dtype: str
    policy: dict
    scheme: str                     # the 4-bit schemes of a compressed path
    ppl: float
    tokens_scored: int
    decode_ppl: float               # through decode steps (every scored token reads the cache)
    decode_tokens: int
    agree: float                    # token agreement vs the resident run, same device + dtype
    prefix: float                   # mean share of tokens before the first difference
    identical: int                  # prompts whose whole output equals the reference
    bit_identical: bool             # same prefill perplexity to the last bit, same outputs
    agree_cpu_fp32: float           # token agreement vs the resident CPU fp32 run
    seconds: float                  # load + perplexity + generation
    weight_quant_s: float = 0.0     # 4-bit weight search at load (or its cache read)
    weight_quant_cached: bool = False
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


def text_prompts(ids: list[int], n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens cut from the text at evenly spaced offsets."""
    length = min(length, len(ids) - 1)
    step = (len(ids) - 1 - length) // max(n - 1, 1)
    return [ids[i * step:i * step + length] for i in range(n)]


def scheme_of(p: dict) -> str:
    """The 4-bit schemes a policy runs, e.g. "w synth g64; kv kivi g64 win 32 sink 4"."""
    parts = []
    bits = "" if p["quant_bits"] == 4 else f" {p['quant_bits']}-bit"
    if p["compress_weight"]:
        parts.append(f"w {p['weight_scheme']}{bits} g{p['quant_group']}")
    if p["compress_cache"]:
        parts.append(f"kv {p['cache_scheme']}{bits} g{p['cache_group']} win "
                     f"{p['cache_window']} sink {p['cache_sink']}")
    return "; ".join(parts) or "-"


def measure(job: Job, device: str, dtype: str, policy: Policy) -> dict:
    """Prefill and decode-path perplexities, greedy outputs, seconds (the load included) and
    the weight search's seconds of one path."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flexrun-acc-") as tmp:
        with LLM(job.model, device=device, policy=policy, dtype=dtype, offload_dir=tmp) as llm:
            nll, count = perplexity_terms(llm, job.ids, job.window, job.stride)
            dnll, dcount = decode_terms(llm, job.ids, job.window, job.window - job.prefill,
                                        job.prefill)
            outs = llm.generate(job.prompts, job.new_tokens, SamplingParams(ignore_eos=True))
            st = llm.stats
    return dict(ppl=math.exp(nll / count), count=count, decode_ppl=math.exp(dnll / dcount),
                decode_count=dcount, outs=[o.output_ids for o in outs],
                secs=time.perf_counter() - t0, wq=st.weight_quant_s,
                wq_cached=st.weight_quant_cached)


def run_path(job: Job, name: str, device: str, dtype: str, overrides: dict,
             ref: Row | None, cpu_ref: Row | None) -> Row:
    policy = Policy(**{**BLOCK, **overrides})
    m = measure(job, device, dtype, policy)
    outs = m["outs"]
    ref_outs = ref.outputs if ref else outs
    same = sum(a == b for a, b in zip(outs, ref_outs))
    exact = ref is None or m["ppl"] == ref.ppl
    row = Row(name, device, dtype, policy.to_dict(), scheme_of(policy.to_dict()), m["ppl"],
              m["count"], m["decode_ppl"], m["decode_count"], agreement(outs, ref_outs),
              common_prefix(outs, ref_outs), same, exact and same == len(outs),
              agreement(outs, cpu_ref.outputs if cpu_ref else outs), m["secs"], m["wq"],
              m["wq_cached"], outs)
    print(f"  {device} {dtype:4s} {name:44s} ppl {m['ppl']:9.5f}  decode {m['decode_ppl']:9.5f}"
          f"  agree {row.agree:6.1%}  ({m['secs']:.1f} s)", file=sys.stderr, flush=True)
    return row


def run_all(job: Job, device: str, dtypes: list[str], all_paths: bool,
            variants: list[Variant] = VARIANTS, on_row=None) -> tuple[list[Row], list[str]]:
    """CPU fp32 resident first (the common reference), on CUDA fp16 and bf16 resident, then
    every variant per dtype against the resident run of its device and dtype.
    Returns the rows and the names of the variants skipped (host_noop on a CPU device);
    on_row(rows, skipped) after each row (a run stopped early keeps what it measured)."""
    skipped = [v.name for v in variants if v.host_noop and device == "cpu" and not all_paths]
    rows: list[Row] = []

    def add(row: Row) -> Row:
        rows.append(row)
        if on_row is not None:
            on_row(rows, skipped)
        return row
    cpu_ref = add(run_path(job, "resident", "cpu", "fp32", {}, None, None))
    refs = {("cpu", "fp32"): cpu_ref}
    resident = list(dict.fromkeys((["fp16", "bf16"] if device == "cuda" else []) + dtypes))
    for dt in resident:
        if (device, dt) not in refs:
            refs[(device, dt)] = add(run_path(job, "resident", device, dt, {}, None, cpu_ref))
    for dt in dtypes:
        for v in variants:
            if v.name not in skipped:
                add(run_path(job, v.name, device, dt, v.overrides, refs[(device, dt)], cpu_ref))
    return rows, skipped


def markdown(rows: list[Row], header: str, skipped: list[str]) -> str:
    gpu = any(r.device != "cpu" for r in rows)
    refs = {(r.device, r.dtype): r for r in rows if r.path == "resident"}
    out = [header, "",
           "| path | device | dtype | 4-bit scheme | perplexity (prefill) | Δ | "
           "perplexity (decode path) | Δ | token agreement | tokens before 1st diff | "
           "identical outputs | bit-identical | weight search s |"
           + (" agreement vs CPU fp32 |" if gpu else ""),
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"
           + ("---:|" if gpu else "")]
    for r in rows:
        ref = refs[(r.device, r.dtype)]
        d, dd = r.ppl / ref.ppl - 1, r.decode_ppl / ref.decode_ppl - 1
        wq = "-" if not r.policy["compress_weight"] else \
            f"{r.weight_quant_s:.1f}" + (" (cache)" if r.weight_quant_cached else "")
        out.append(f"| {r.path} | {r.device} | {r.dtype} | {r.scheme} | {r.ppl:.4f} | "
                   f"{d:+.2%} | {r.decode_ppl:.4f} | {dd:+.2%} | {r.agree:.1%} | "
                   f"{r.prefix:.1%} | {r.identical}/{len(r.outputs)} | "
                   f"{'yes' if r.bit_identical else 'no'} | {wq} |"
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
    same = ("compress_cache", "cache_scheme", "cache_window", "cache_sink")
    return any({k: v for k, v in o.policy.items() if k not in same}
               == {k: v for k, v in base.items() if k not in same} and not o.policy[same[0]]
               and (o.device, o.dtype) == (r.device, r.dtype) and o.ppl == r.ppl
               and o.decode_ppl == r.decode_ppl and o.outputs == r.outputs for o in rows)


def parse_variant(spec: str) -> Variant:
    """"key=val,key=val" (Policy fields; ints, floats, true/false, names) -> a Variant."""
    def value(x: str):
        if x.lower() in ("true", "false"):
            return x.lower() == "true"
        for cast in (int, float):
            try:
                return cast(x)
            except ValueError:
                pass
        return x
    pairs = [kv.split("=", 1) for kv in spec.split(",") if kv]
    if any(len(kv) != 2 for kv in pairs):
        raise SystemExit(f"bench.accuracy: --variant {spec!r}: expected key=value pairs")
    return Variant(spec, {k.strip(): value(v.strip()) for k, v in pairs})


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
    ap.add_argument("--prefill", type=int, default=32,
                    help="decode-path score: tokens prefilled per window before decoding")
    ap.add_argument("--prompts", type=int, default=16,
                    help="greedy prompts, cut from the text at evenly spaced offsets")
    ap.add_argument("--prompt-len", type=int, default=224, help="tokens per greedy prompt")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--keep-weight-cache", action="store_true",
                    help="use the user's quantized-weight cache (default: a temporary one, so "
                         "the first load of each scheme shows its search time)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 with --device cpu: on a shared 2-core "
                         "machine two threads can be several times slower; 0 = torch default)")
    ap.add_argument("--all-paths", action="store_true",
                    help="on cpu also run the paths that are the resident code there")
    ap.add_argument("--only", default=None, metavar="REGEX",
                    help="run only the variants whose name matches (resident always runs)")
    ap.add_argument("--variant", action="append", default=[], metavar="KEY=VAL,..",
                    help="an extra path: Policy overrides, e.g. compress_cache=true,"
                         "cache_window=64 (repeatable)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default bench/results/accuracy-<device>.json)")
    a = ap.parse_args(argv)
    if a.prompts < 1 or a.prompt_len < 1:
        ap.error("--prompts and --prompt-len must be >= 1")
    if a.window < 2 or not 1 <= a.stride <= a.window or a.new_tokens < 1:
        ap.error("need --window >= 2, 1 <= --stride <= --window and --new-tokens >= 1")
    if not 1 <= a.prefill < a.window:
        ap.error("need 1 <= --prefill < --window")
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
    saved = os.environ.get("FLEXRUN_QUANT_CACHE")
    try:
        with tempfile.TemporaryDirectory(prefix="flexrun-quant-") as qdir:
            if not a.keep_weight_cache:
                os.environ["FLEXRUN_QUANT_CACHE"] = qdir
            _run(a, " ".join(["python -m bench.accuracy", *shown]))
    finally:
        torch.set_num_threads(before)
        if saved is None:
            os.environ.pop("FLEXRUN_QUANT_CACHE", None)
        else:
            os.environ["FLEXRUN_QUANT_CACHE"] = saved


def _run(a: argparse.Namespace, command: str) -> None:
    dtypes = (a.dtypes or ("fp16" if a.device == "cuda" else "fp32")).split(",")
    model = resolve_named(a.model)
    ckpt = open_checkpoint(model)
    ids = ckpt.tokenizer.encode(Path(a.text).read_text(encoding="utf-8")).ids
    job = Job(model, ids, a.window, a.stride, text_prompts(ids, a.prompts, a.prompt_len),
              a.new_tokens, a.prefill)
    t0 = time.perf_counter()
    variants = [v for v in VARIANTS if a.only is None or re.search(a.only, v.name)]
    variants += [parse_variant(spec) for spec in a.variant]
    out = Path(a.out or ROOT / "bench" / "results" / f"accuracy-{a.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows: list[Row], skipped: list[str], done: bool) -> str:
        total = time.perf_counter() - t0
        header = (f"`{command}` on {device_name(a.device)}, torch {torch.__version__}, "
                  f"{total:.0f} s{'' if done else ' (stopped early: the rows so far)'}. "
                  f"Model {ckpt.spec.name or a.model}. Perplexity: "
                  f"{_shown(a.text)}, {len(ids)} tokens, window {a.window}, stride {a.stride}; "
                  f"decode path: prefill {a.prefill}, stride {a.window - a.prefill}. Greedy: "
                  f"{len(job.prompts)} prompts of {len(job.prompts[0])} tokens from the text x "
                  f"{a.new_tokens} new tokens (EOS ignored), "
                  f"block {BLOCK['gpu_batch_size']}x{BLOCK['num_gpu_batches']}.")
        table = markdown(rows, header, skipped)
        out.write_text(_compact(json.dumps({
            "command": command, "device": device_name(a.device), "torch": torch.__version__,
            "model": a.model, "model_file": Path(model).name, "text": _shown(a.text),
            "text_tokens": len(ids), "window": a.window, "stride": a.stride,
            "prefill": a.prefill, "decode_stride": a.window - a.prefill,
            "prompts": job.prompts, "new_tokens": a.new_tokens, "block": BLOCK,
            "total_s": round(total, 1), "complete": done, "skipped": skipped,
            "rows": [asdict(r) for r in rows], "table": table}, indent=1)) + "\n")
        return table
    rows, skipped = run_all(job, a.device, dtypes, a.all_paths, variants,
                            on_row=lambda r, s: write(r, s, False))
    print(write(rows, skipped, True))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
