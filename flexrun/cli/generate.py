"""`flexrun generate`: a resumable JSONL job (every finished line is durable after its block;
a job that finishes ends with its output in the input's order)."""
from __future__ import annotations

import json
import os
import signal
import sys

from flexrun.api import LLM
from flexrun.cli.common import StopFlag, open_llm, sampling_from_args
from flexrun.config import FlexrunError
from flexrun.jobs import OutputWriter, finished_ids, order_output, read_input


class _Stopped(Exception):
    pass


def _workload(args, todo) -> tuple[int, int, int] | None:
    """(longest prompt in tokens, max_new_tokens, prompts) for --policy auto, else None."""
    if args.policy != "auto":
        return None
    texts = [it.prompt for it in todo if it.prompt is not None]
    longest = max((len(it.input_ids) for it in todo if it.input_ids is not None), default=1)
    if texts:
        from flexrun.models.loader import open_checkpoint
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
        finished = written == len(todo)
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
