"""`flexrun generate | policy search | profile | eval-ppl | trace-png` (argparse entry point)."""
from __future__ import annotations

import argparse
import sys

from flexrun.cli.common import add_model_args
from flexrun.cli.ray_job import add_ray_args, wants_ray
from flexrun.config import FlexrunError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flexrun", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate for every prompt of a JSONL file")
    add_model_args(g)
    g.add_argument("--input", required=True)
    g.add_argument("--output", required=True)
    g.add_argument("--format", choices=["auto", "plain", "openai"], default="auto",
                   help="plain: {\"id\", \"prompt\" | \"input_ids\" | \"messages\"} lines; "
                   "openai: OpenAI Batch API request lines (/v1/chat/completions, "
                   "/v1/completions); auto: openai when the first line has custom_id and body")
    g.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template for \"messages\" (default: the model's own)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="plain: new tokens of a row that sets no max_tokens (default 32); "
                   "openai: a cap on every request's max_tokens (default: none, up to the "
                   "model's positions)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--truncate", choices=["none", "left"], default="none",
                   help="left: drop the start of prompts longer than the model's positions")
    g.add_argument("--trace", default=None, help="write a Chrome trace of loads and compute")
    g.add_argument("--quiet", action="store_true")
    add_ray_args(g)

    pol = sub.add_parser("policy", help="policy tools")
    psub = pol.add_subparsers(dest="policy_cmd", required=True)
    s = psub.add_parser("search", help="choose a policy with the cost model")
    s.add_argument("--model", required=True)
    s.add_argument("--prompt-len", type=int, required=True)
    s.add_argument("--gen-len", type=int, required=True)
    s.add_argument("--gpu-mem", default=None)
    s.add_argument("--cpu-mem", default=None)
    s.add_argument("--disk-mem", default=None)
    s.add_argument("--device", choices=["cuda", "cpu"], default=None)
    s.add_argument("--profile", default=None, help="hardware profile JSON (flexrun profile)")
    s.add_argument("--compress-weight", action="store_true")
    s.add_argument("--compress-cache", action="store_true")
    s.add_argument("--num-prompts", type=int, default=None)
    s.add_argument("--gpus", type=int, default=1,
                   help="plan N pipeline stages (prints one placement per stage)")
    s.add_argument("-o", "--output", default=None)

    pr = sub.add_parser("profile", help="measure this machine's bandwidths and compute rates")
    pr.add_argument("-o", "--output", required=True)
    pr.add_argument("--offload-dir", default=None)
    pr.add_argument("--device", choices=["cuda", "cpu"], default=None)

    e = sub.add_parser("eval-ppl", help="perplexity of a text file (sliding window)")
    add_model_args(e)
    e.add_argument("--text", required=True)
    e.add_argument("--window", type=int, default=256)
    e.add_argument("--stride", type=int, default=128)
    e.add_argument("--decode", action="store_true",
                   help="also score through decode steps (teacher forcing), every scored "
                   "token reading the KV cache as generation does (compressed or not)")
    e.add_argument("--prefill", type=int, default=32,
                   help="with --decode: tokens of each window prefilled before decoding")

    t = sub.add_parser("trace-png", help="render a --trace JSON to a PNG timeline")
    t.add_argument("trace")
    t.add_argument("-o", "--output", required=True)
    t.add_argument("--step", type=int, default=None,
                   help="draw only this generation step (0 = prefill, 1 = first decode step)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "generate" and wants_ray(args):
            from flexrun.cli.ray_job import ray_generate
            return ray_generate(args)
        if args.cmd == "generate":
            from flexrun.cli.generate import generate
            return generate(args)
        if args.cmd == "policy":
            from flexrun.cli.policy import policy_search
            return policy_search(args)
        if args.cmd == "profile":
            from flexrun.cli.profile import profile_command
            return profile_command(args)
        if args.cmd == "eval-ppl":
            from flexrun.cli.eval_ppl import eval_ppl
            return eval_ppl(args)
        if args.cmd == "trace-png":
            from flexrun.cli.trace_png import render
            render(args.trace, args.output, step=args.step)
            return 0
    except FlexrunError as e:
        print(f"flexrun: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flexrun: interrupted", file=sys.stderr)
        return 130
    return 1
