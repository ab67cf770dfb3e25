"""`flexrun generate`: a resumable JSONL job (every finished line is durable after its block;
a job that finishes ends with its output in the input's order). Input lines are plain
({"id", "prompt" | "input_ids" | "messages", ...}) or OpenAI Batch API requests (--format)."""
from __future__ import annotations

import json
import os
import signal
import sys

from flexrun.api import LLM
from flexrun.cli.common import StopFlag, open_llm, sampling_defaults
from flexrun.config import FlexrunError
from flexrun.jobs import (LineError, OutputWriter, Pieces, calls, error_line, finished_ids,
                          model_names, openai_request, order_output, plain_line, plain_request,
                          read_job, response_line)


class _Stopped(Exception):
    pass


def _workload(args, todo) -> tuple[int, int, int] | None:
    """(longest prompt in tokens, new tokens, prompts) for --policy auto, else None; a chat
    counts its contents' tokens (the template adds a few)."""
    if args.policy != "auto":
        return None
    texts = [it.prompt for it in todo if it.prompt is not None]
    chats = [" ".join(m["content"] for m in it.messages) for it in todo
             if it.messages is not None]
    longest = max((len(it.input_ids) for it in todo if it.input_ids is not None), default=1)
    if texts or chats:
        from flexrun.models.loader import open_checkpoint
        tok = open_checkpoint(args.model).tokenizer
        if tok is not None:
            longest = max([longest] + [len(e.ids) for e in tok.encode_batch(texts + chats)])
    new = max([args.max_new_tokens or 0] + [it.options.get("max_tokens", 0) for it in todo])
    return max(longest, 1), new or 32, len(todo)


def read_template(path: str | None) -> str | None:
    """The template text of --chat-template FILE (read before the model loads)."""
    if path is None:
        return None
    from flexrun.models.chat import load_template
    try:
        return load_template(path)
    except FlexrunError as e:
        raise FlexrunError(f"{e}: pass a Jinja chat template file (or a tokenizer_config.json "
                           "holding one) as --chat-template") from None


def generate(args) -> int:
    """Run a JSONL job; every finished line is durable after its block, so a rerun resumes."""
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise FlexrunError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    template = read_template(args.chat_template)
    fmt, items = read_job(args.input, args.format)
    done = finished_ids(args.output)
    todo = [it for it in items if json.dumps(it.id) not in done]
    rank0 = int(os.environ.get("RANK", "0")) == 0       # under torchrun, rank 0 speaks
    quiet = args.quiet or not rank0
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    if not todo:
        if rank0:
            order_output(args.output, items)    # (a run stopped before its rewrite)
        say(f"flexrun: all {len(items)} ids are already in {args.output}; nothing to do")
        return 0
    if done:
        say(f"flexrun: resuming: {len(items) - len(todo)} of {len(items)} ids already done")
    stop = StopFlag(immediate=True)     # while loading, a signal stops at once
    llm = writer = None
    written = 0
    finished = False

    def after_block():
        if writer is not None:
            writer.sync()
        if llm.any_rank(stop.signum is not None) and written < len(todo):
            raise _Stopped      # (under torchrun every rank stops after the same block)

    def write(row: dict) -> None:
        nonlocal written
        if writer is not None:
            writer.write(row)
        written += 1
    try:
        runnable = [it for it in todo if it.error is None]
        _need_template(args, runnable, template)
        if runnable:
            llm = open_llm(args, trace=args.trace, workload=_workload(args, runnable))
        writer = OutputWriter(args.output) if (llm.is_main if llm else rank0) else None
        stop.immediate = False          # from here on: stop after the current block
        if llm is not None:
            for line in policy_lines(llm):
                say(line)
        reqs = _requests(args, fmt, todo, llm, template, write)
        if writer is not None:
            writer.sync()
        pieces = Pieces(llm.tokenizer) if llm is not None else None
        for m, group in calls(reqs, llm.spec.max_positions if llm else 0):
            outs = llm.iter_generate([r.prompt for r in group], m, [r.params for r in group],
                                     progress=not quiet, on_block_done=after_block,
                                     truncate=args.truncate == "left",
                                     names=[r.item.id for r in group])
            for o in outs:
                it = group[o.index].item
                write(plain_line(it, o, pieces.piece) if fmt == "plain" else
                      response_line(it, o, it.model or args.model, pieces))
        finished = written == len(todo)
        if args.expert_stats and llm is not None and llm.spec.num_experts and llm.is_main:
            llm.save_expert_stats(args.expert_stats)
            say(f"flexrun: routing counts written to {args.expert_stats}")
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
        _cleanup(stop, writer, llm, items if finished else None)
    failed = sum(1 for it in todo if it.error is not None)
    if llm is None:
        say(f"flexrun: {written} error lines written to {args.output}")
        return 0
    st = llm.stats
    total = st.prefill_s + st.decode_s
    say(f"flexrun: {written} outputs written to {args.output}"
        f"{f' ({failed} of them errors)' if failed else ''}; {st.generated_tokens} tokens in "
        f"{total:.2f}s ({st.generated_tokens / max(total, 1e-9):.1f} tok/s; prefill "
        f"{st.prefill_s:.2f}s, decode {st.decode_s:.2f}s)" + _compressed(llm))
    return 0


def _compressed(llm) -> str:
    """The run's 4-bit settings and the weights' quantization time, for its last line."""
    what = llm.policy.compression()
    if not what:
        return ""
    if llm.policy.compress_weight:
        st = llm.stats
        what += f"; weight quantization {st.weight_quant_s:.1f}s" + \
            (" (from the cache)" if st.weight_quant_cached else "")
    return f"; 4-bit: {what}"


def _requests(args, fmt: str, todo, llm, template: str | None, write) -> list:
    """The runnable items as requests; openai lines that cannot run are written as error
    lines (a plain line's problem is an error of the whole job)."""
    if fmt == "plain":
        defaults = sampling_defaults(args)
        return [plain_request(it, llm, defaults, args.max_new_tokens, args.seed, template)
                for it in todo]
    reqs, names = [], None
    for it in todo:
        if it.error is None:
            if names is None:
                names = model_names(args.model, llm.spec.name)
            try:
                reqs.append(openai_request(it, llm, names, args.max_new_tokens, args.seed,
                                           template, args.truncate == "left",
                                           args.ignore_eos))
                continue
            except LineError as e:
                it.error = e
        write(error_line(it, it.error))
    return reqs


def _need_template(args, todo, template: str | None) -> None:
    """Chat lines need a chat template, the model's or --chat-template's; without one the job
    stops before the model loads (each line's error would be final)."""
    if template is not None or not any(it.messages is not None and it.error is None
                                       for it in todo):
        return
    from flexrun.models.loader import open_checkpoint
    if not open_checkpoint(args.model).chat_template:
        raise FlexrunError(f"{args.model} has no chat template and the input holds chat "
                           '"messages": pass --chat-template FILE (a Jinja chat template)')


def policy_lines(llm: LLM) -> list[str]:
    """The plan auto chose in one line, else the policy as JSON; one line per pipeline stage
    when there are several."""
    if len(llm.stages) == 1 and llm.plan is not None:
        return [f"flexrun: {llm.plan.line()}"]
    if len(llm.stages) == 1:
        return [f"flexrun: policy {json.dumps(llm.policy.to_dict())}"]
    from flexrun.plan.stages import describe
    return [f"flexrun: stage {i} ({describe(llm.spec, u)}): policy {json.dumps(p.to_dict())}"
            for i, (u, p) in enumerate(zip(llm.stages, llm.stage_policies))]


def _cleanup(stop: StopFlag, writer: OutputWriter | None, llm: LLM | None,
             order: list | None = None) -> None:
    """Sync the output (and put it in the input's `order` when the job finished) and remove
    offload files, whatever fails; a signal cannot cut it short."""
    stop.closing = True
    try:
        if writer is not None:
            writer.close()
            if order is not None:
                order_output(writer.path, order)
    finally:
        try:
            if llm is not None:
                llm.close()
        finally:
            stop.restore()
