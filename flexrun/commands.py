"""The CLI commands' bodies: generate (resumable JSONL job), policy search, eval-ppl."""
from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

from .api import LLM
from .cli import StopFlag, sampling_from_args
from .config import FlexrunError, Policy
from .jobs import OutputWriter, finished_ids, read_input


class _Stopped(Exception):
    pass


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
        return "auto"
    base = Policy.load(pol) if pol else Policy()
    return Policy.from_dict({**base.to_dict(), **overrides}) if overrides else base


def _with_policy(args, policy: str):
    import copy
    out = copy.copy(args)
    out.policy = policy
    return out


def open_llm(args, **extra) -> LLM:
    policy = policy_from_args(args)
    return LLM(args.model, device=args.device, policy=policy, gpu_mem=args.gpu_mem,
               cpu_mem=args.cpu_mem, offload_dir=args.offload_dir, dtype=args.dtype,
               disk_mem=args.disk_mem, compress_weight=args.compress_weight,
               compress_cache=args.compress_cache, num_gpus=args.gpus, **extra)


def _workload(args, todo) -> tuple[int, int, int] | None:
    """(longest prompt in tokens, max_new_tokens, prompts) for --policy auto, else None."""
    if args.policy != "auto":
        return None
    texts = [it.prompt for it in todo if it.prompt is not None]
    longest = max((len(it.input_ids) for it in todo if it.input_ids is not None), default=1)
    if texts:
        from .models.loader import open_checkpoint
        tok = open_checkpoint(args.model).tokenizer
        if tok is not None:
            longest = max([longest] + [len(e.ids) for e in tok.encode_batch(texts)])
    return max(longest, 1), args.max_new_tokens, len(todo)


def generate(args) -> int:
    """Run a JSONL job; every finished line is durable after its block, so a rerun resumes."""
    if args.max_new_tokens < 1:
        raise FlexrunError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    items = read_input(args.input)
    done = finished_ids(args.output)
    todo = [it for it in items if json.dumps(it.id) not in done]
    rank0 = int(os.environ.get("RANK", "0")) == 0       # under torchrun, rank 0 speaks
    quiet = args.quiet or not rank0
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    if not todo:
        say(f"flexrun: all {len(items)} ids are already in {args.output}; nothing to do")
        return 0
    if done:
        say(f"flexrun: resuming: {len(items) - len(todo)} of {len(items)} ids already done")
    stop = StopFlag(immediate=True)     # while loading, a signal stops at once
    llm = writer = None
    written = 0

    def after_block():
        if writer is not None:
            writer.sync()
        if llm.any_rank(stop.signum is not None) and written < len(todo):
            raise _Stopped      # (under torchrun every rank stops after the same block)
    try:
        llm = open_llm(args, trace=args.trace, workload=_workload(args, todo))
        writer = OutputWriter(args.output) if llm.is_main else None
        stop.immediate = False          # from here on: stop after the current block
        for line in policy_lines(llm):
            say(line)
        outs = llm.iter_generate([it.value for it in todo], args.max_new_tokens,
                                 sampling_from_args(args), progress=not quiet,
                                 on_block_done=after_block, truncate=args.truncate == "left",
                                 names=[it.id for it in todo])
        for o in outs:
            if writer is not None:
                writer.write({"id": todo[o.index].id, "output_ids": o.output_ids,
                              "text": o.text, "finish_reason": o.finish_reason})
            written += 1
    except (_Stopped, KeyboardInterrupt) as e:
        if stop.signum is None and not isinstance(e, _Stopped):
            raise
        if stop.signum is None:         # another rank was signalled
            return 128 + signal.SIGTERM
        if rank0:
            print(f"flexrun: stopped by {stop.name} after {len(items) - len(todo) + written} "
                  f"of {len(items)} ids; rerun the same command to resume", file=sys.stderr)
        return 128 + stop.signum
    finally:
        _cleanup(stop, writer, llm)
    st = llm.stats
    total = st.prefill_s + st.decode_s
    say(f"flexrun: {written} outputs written to {args.output}; {st.generated_tokens} tokens in "
        f"{total:.2f}s ({st.generated_tokens / max(total, 1e-9):.1f} tok/s; prefill "
        f"{st.prefill_s:.2f}s, decode {st.decode_s:.2f}s)")
    return 0


def policy_lines(llm: LLM) -> list[str]:
    """The policy as JSON; one line per pipeline stage when there are several."""
    if len(llm.stages) == 1:
        return [f"flexrun: policy {json.dumps(llm.policy.to_dict())}"]
    from .engine.stages import describe
    return [f"flexrun: stage {i} ({describe(llm.spec, u)}): policy {json.dumps(p.to_dict())}"
            for i, (u, p) in enumerate(zip(llm.stages, llm.stage_policies))]


def _cleanup(stop: StopFlag, writer: OutputWriter | None, llm: LLM | None) -> None:
    """Sync the output and remove offload files, whatever fails; a signal cannot cut it short."""
    stop.closing = True
    try:
        if writer is not None:
            writer.close()
    finally:
        try:
            if llm is not None:
                llm.close()
        finally:
            stop.restore()


def policy_search(args) -> int:
    if args.gpus > 1:
        return stage_search(args)
    from .policysearch import search_command
    return search_command(args)


def stage_search(args) -> int:
    """`flexrun policy search --gpus N`: the stages and each one's placement (-o writes one
    policy file per stage, <output>.stage<i>.json)."""
    import torch
    from .engine.stages import describe, plan_stages
    from .models.loader import open_checkpoint
    from .policysearch import device_and_profile
    from .stageplan import format_plan, search_stages
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


def eval_ppl(args) -> int:
    """Perplexity over a text with a sliding window (each token scored once)."""
    path = Path(args.text)
    if not path.is_file():
        raise FlexrunError(f"text file {path} not found")
    if args.stride < 1 or args.window < 2 or args.stride > args.window:
        raise FlexrunError("need window >= 2 and 1 <= stride <= window")
    with open_llm(args) as llm:
        if llm.tokenizer is None:
            raise FlexrunError(f"{args.model} has no tokenizer: eval-ppl needs text input")
        ids = llm.tokenizer.encode(path.read_text(encoding="utf-8")).ids
        nll, count = perplexity_terms(llm, ids, args.window, args.stride)
    ppl = math.exp(nll / max(count, 1))
    print(json.dumps({"model": args.model, "text": str(path), "tokens": count,
                      "window": args.window, "stride": args.stride, "ppl": ppl}))
    return 0


def perplexity_terms(llm: LLM, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Sum of token NLLs and the number of scored tokens, HF-style sliding window."""
    import torch
    windows, targets, prev_end = [], [], 0
    for begin in range(0, max(len(ids) - 1, 1), stride):
        end = min(begin + window, len(ids))
        windows.append(ids[begin:end])
        targets.append(end - prev_end if begin else end - 1)   # tokens scored in this window
        prev_end = end
        if end == len(ids):
            break
    nll, count = 0.0, 0
    for w, logits, n in zip(windows, llm.prompt_logits(windows), targets):
        lp = torch.log_softmax(logits[:-1].double(), -1)
        tgt = torch.tensor(w[1:])
        tok_nll = -lp.gather(-1, tgt[:, None])[:, 0]
        nll += float(tok_nll[-n:].sum())
        count += n
    return nll, count
