"""`flexrun policy search`: the cost model's placement for a model, workload and budgets."""
from __future__ import annotations

import torch

from flexrun.models.loader import open_checkpoint
from flexrun.plan.search import device_and_profile, search_command
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
