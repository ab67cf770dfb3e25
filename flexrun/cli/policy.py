"""`flexrun policy search`: the cost model's placement for a model, workload and budgets."""
from __future__ import annotations

import torch

from flexrun.config import FlexrunError, format_size
from flexrun.models.loader import open_checkpoint
from flexrun.plan.hardware import HardwareProfile, default_profile
from flexrun.plan.cost_types import SearchResult
from flexrun.plan.search import search
from flexrun.plan.stage_search import format_plan, search_stages
from flexrun.plan.stages import describe, plan_stages


def policy_search(args) -> int:
    if args.gpus > 1:
        return stage_search(args)
    return search_command(args)


def stage_search(args) -> int:
    """`flexrun policy search --gpus N`: the stages and each one's placement (-o writes one
    policy file per stage, <output>.stage<i>.json)."""
    device, prof = device_and_profile(args)
    spec = open_checkpoint(args.model).spec
    dtype = torch.float16 if device == "cuda" else torch.float32
    stages = plan_stages(spec, dtype, args.gpus, args.compress_weight)
    plan = search_stages(spec, prof, stages, args.prompt_len, args.gen_len, args.gpu_mem,
                         args.cpu_mem, args.disk_mem, device, num_prompts=args.num_prompts,
                         compress_weight=args.compress_weight,
                         compress_cache=args.compress_cache)
    print(format_plan(plan, lambda u: describe(spec, u)))
    if args.output:
        flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                 for k, v in vars(args).items() if k not in ("cmd", "policy_cmd", "device")
                 and v not in (None, False)]
        cmd = " ".join(["flexrun policy search", *flags, f"--device {device}"])
        for i, (pol, st) in enumerate(zip(plan.policies, plan.to_dict()["stages"])):
            path = f"{args.output}.stage{i}.json"
            pol.save(path, command=cmd, predicted={
                "stage": i, "units": st["units"], "prefill_s": st["prefill_s"],
                "decode_s": st["decode_s"], "pipeline_throughput_tok_s": plan.throughput,
                "profile": prof.device_name, "profile_source": prof.source})
            print(f"stage {i} policy written to {path}")
    return 0


def format_result(res: SearchResult) -> str:
    p, pr = res.policy, res.prediction
    fmt = lambda t: "/".join(f"{x:g}" for x in t)  # noqa: E731
    return "\n".join([
        f"policy: batch {p.gpu_batch_size} x {p.num_gpu_batches}, weights {fmt(p.weights_split())}"
        f", cache {fmt(p.cache_split())}, act {fmt(p.act_split())} (% gpu/cpu/disk), "
        f"cpu_attention {p.cpu_attention}, compress weight/cache "
        f"{p.compress_weight}/{p.compress_cache}",
        f"predicted: prefill {pr.prefill_s:.3f}s, decode {pr.decode_s:.4f}s/step "
        f"({pr.decode_throughput:.1f} tok/s), total {pr.throughput:.2f} tok/s"
        + (" (disk reads from page cache)" if pr.disk_cached else ""),
        "peak memory: " + ", ".join(f"{t} {format_size(v)}" for t, v in pr.peak.items()),
        f"search: {res.candidates} block shapes, {res.lp_solves} LPs (slowest "
        f"{res.lp_max_s * 1e3:.0f} ms) in {res.search_s:.2f}s"])


def device_and_profile(args) -> tuple[str, HardwareProfile]:
    """A search's device (--device, else cuda with a GPU here or a GPU --profile) and profile."""
    prof = HardwareProfile.load(args.profile) if args.profile else None
    gpu_profile = prof is not None and prof.h2d_pinned is not None   # measured with a GPU
    device = args.device or ("cuda" if torch.cuda.is_available() or gpu_profile else "cpu")
    if device == "cpu" and args.gpu_mem is not None:
        raise FlexrunError("--gpu-mem is given but the search is for the CPU (no GPU here and "
                           "a CPU profile): pass --device cuda with a GPU profile, or drop it")
    return device, prof or default_profile(device)


def search_command(args) -> int:
    """`flexrun policy search ...`: print the policy and its prediction; -o writes JSON."""
    from flexrun.models.loader import open_checkpoint
    device, prof = device_and_profile(args)
    spec = open_checkpoint(args.model).spec
    res = search(spec, prof, args.prompt_len, args.gen_len, args.gpu_mem, args.cpu_mem,
                 args.disk_mem, device, num_prompts=args.num_prompts,
                 compress_weight=args.compress_weight, compress_cache=args.compress_cache)
    print(format_result(res))
    if args.output:
        flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                 for k, v in vars(args).items() if k not in ("cmd", "policy_cmd", "output",
                                                             "device") and v not in (None, False)]
        cmd = " ".join(["flexrun policy search", *flags, f"--device {device}",
                        f"-o {args.output}"])
        res.policy.save(args.output, command=cmd,
                        predicted={**res.prediction.to_dict(), "profile": prof.device_name,
                                   "profile_source": prof.source})
        print(f"policy written to {args.output}")
    return 0
