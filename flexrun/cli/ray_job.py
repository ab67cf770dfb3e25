"""`flexrun generate --ray [ADDRESS|local] --workers N`: the same JSONL job on a Ray cluster.

The driver reads and checks the input and the output to resume from as `flexrun generate`
does, sends the lines still to do to a pool of FlexrunPredictor actors (ray.data
map_batches: one LLM per actor; Ray restarts a dead actor and retries its batches), and
appends each returned block of output lines as it arrives, once per id (a retried batch cannot
add a line twice). A finished job ends with the output in the input's order, as without Ray."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from flexrun.config import FlexrunError
from flexrun.jobs import OutputWriter, finished_ids, line_key, order_output, read_job
from flexrun.jobs.plain import input_lines

if TYPE_CHECKING:
    from flexrun.ray import GenerateConfig

_ERROR_LINE = re.compile(r"flexrun\.config\.FlexrunError: (.*)")
CALLS_PER_WORKER = 4        # default batch size: the job in about this many calls per actor
MAX_BATCH = 256


def add_ray_args(g) -> None:
    """The --ray options of `flexrun generate`."""
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS|local",
                   help="run on Ray: a cluster's ADDRESS (auto, ray://host:10001) or local "
                   "(a Ray started here; the default of a bare --ray); needs "
                   "pip install 'flexrun[ray]'")
    g.add_argument("--workers", type=int, default=None,
                   help="with --ray: actors, each its own model replica (default 1)")
    g.add_argument("--worker-cpus", type=float, default=1.0,
                   help="with --ray: CPUs per actor (default 1; its torch threads)")
    g.add_argument("--ray-batch-size", type=int, default=None,
                   help="with --ray: rows per actor call, what a retry redoes (default: "
                   f"about {CALLS_PER_WORKER} calls per worker, at most {MAX_BATCH})")


def wants_ray(args) -> bool:
    """Whether `flexrun generate` runs over Ray (any --ray option given)."""
    return args.ray is not None or args.workers is not None or args.ray_batch_size is not None


def check_ray_args(args) -> None:
    if args.ray is None:
        if args.workers is not None or args.ray_batch_size is not None:
            raise FlexrunError("--workers and --ray-batch-size need --ray")
        return
    if args.workers is not None and args.workers < 1:
        raise FlexrunError(f"--workers must be >= 1, got {args.workers}")
    if args.ray_batch_size is not None and args.ray_batch_size < 1:
        raise FlexrunError(f"--ray-batch-size must be >= 1, got {args.ray_batch_size}")
    if args.gpus not in (None, 1):
        raise FlexrunError("--ray runs one replica per actor: drop --gpus (pipeline stages "
                           "run under torchrun, docs/scaling.md)")
    if args.trace is not None:
        raise FlexrunError("--trace is not supported with --ray: trace a run without it")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise FlexrunError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")


def ray_generate(args) -> int:
    """Run the job over Ray; returns the exit code."""
    check_ray_args(args)
    try:
        import ray
        import ray.data
    except ImportError:
        raise FlexrunError("--ray needs Ray: pip install 'flexrun[ray]' (or 'ray[data]')") \
            from None
    from flexrun.cli.generate import _need_template, read_template
    from flexrun.ray import map_generate
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    template = read_template(args.chat_template)
    fmt, items = read_job(args.input, args.format)
    if fmt != "plain":
        raise FlexrunError("--ray runs plain JSONL jobs ({\"id\", \"prompt\" | \"input_ids\" "
                           "| \"messages\"}); run OpenAI batch files without --ray")
    done = finished_ids(args.output)
    todo = [it for it in items if json.dumps(it.id) not in done]
    if not todo:
        order_output(args.output, items)
        say(f"flexrun: all {len(items)} ids are already in {args.output}; nothing to do")
        return 0
    if done:
        say(f"flexrun: resuming: {len(items) - len(todo)} of {len(items)} ids already done")
    _need_template(args, todo, template)
    text = dict(input_lines(Path(args.input)))
    rows = [{"json": text[it.line]} for it in todo]
    started = _connect(ray, args.ray, args.quiet)
    try:
        workers = args.workers or 1
        batch = args.ray_batch_size or min(MAX_BATCH, max(1, math.ceil(
            len(todo) / (CALLS_PER_WORKER * workers))))
        gpus = _gpus_per_actor(ray, args.device)
        if started:
            _check_fits(ray, workers, args.worker_cpus, gpus)
        cfg = _config(args, template, todo, batch, "cuda" if gpus else "cpu")
        say(f"flexrun: ray: {workers} workers x ({args.worker_cpus:g} CPUs, {gpus} GPUs), "
            f"{len(todo)} rows in calls of {batch}")
        ds = map_generate(ray.data.from_items(rows), cfg, workers, args.worker_cpus, gpus,
                          batch)
        t0 = time.perf_counter()
        written, tokens = stream_output(ds, args.output, done)
        secs = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    if written + len(items) - len(todo) == len(items):
        order_output(args.output, items)
    say(f"flexrun: {written} outputs written to {args.output}; {tokens} tokens in {secs:.2f}s "
        f"({tokens / max(secs, 1e-9):.1f} tok/s, {workers} Ray workers)")
    return 0


def _connect(ray, address: str, quiet: bool) -> bool:
    """ray.init unless this process is connected already; True when it connected here."""
    import ray.data
    ctx = ray.data.DataContext.get_current()
    if quiet:
        ctx.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return False
    ray.init(address=None if address == "local" else address, include_dashboard=False,
             log_to_driver=not quiet, logging_level=logging.WARNING if quiet else logging.INFO)
    return True


def _check_fits(ray, workers: int, cpus: float, gpus: int) -> None:
    """A local Ray must hold the whole pool (a cluster may scale up to it)."""
    have = ray.cluster_resources()
    for name, each in (("CPU", cpus), ("GPU", gpus)):
        if each and workers * each > have.get(name, 0):
            raise FlexrunError(f"--workers {workers} need {workers * each:g} {name}s and the "
                               f"local Ray has {have.get(name, 0):g}: lower --workers or "
                               "--worker-cpus")


def _gpus_per_actor(ray, device: str | None) -> int:
    if device is not None:
        return 1 if device == "cuda" else 0
    return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0


def _config(args, template: str | None, todo: list, batch: int, device: str
            ) -> GenerateConfig:
    """The actors' config from the command line (their plan: rows per call as prompts)."""
    from flexrun.cli.common import policy_from_args
    from flexrun.cli.generate import _workload
    from flexrun.ray import GenerateConfig
    from flexrun.ray.predictor import FAIL_ENV
    policy = policy_from_args(args)
    workload = _workload(args, todo)
    fail = os.environ.get(FAIL_ENV)
    after, _, once = fail.partition(":") if fail else (None, "", "")
    return GenerateConfig(
        model=args.model, device=device, dtype=args.dtype, policy=policy, gpu_mem=args.gpu_mem,
        cpu_mem=args.cpu_mem, disk_mem=args.disk_mem, offload_dir=args.offload_dir,
        compress_weight=args.compress_weight, compress_cache=args.compress_cache,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos,
        truncate=args.truncate == "left", chat_template=template,
        workload=None if workload is None else (workload[0], workload[1], batch),
        full_output=True, fail_after=None if after is None else int(after),
        fail_once=once or None)


def flexrun_cause(e: BaseException | None) -> FlexrunError | None:
    """The FlexrunError behind a Ray error: RayTaskError.cause or a chained cause, else the
    last "FlexrunError: ..." line of an error that kept only the worker's traceback as text
    (an actor that died in __init__)."""
    seen, texts = set(), []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None)
        if isinstance(inner, FlexrunError):
            return inner
        if isinstance(e, FlexrunError) and inner is None:
            return e
        texts.append(str(e))
        e = inner if isinstance(inner, BaseException) else (e.__cause__ or e.__context__)
    for text in texts:
        found = _ERROR_LINE.findall(text)
        if found:
            return FlexrunError(found[-1].strip())
    return None


def stream_output(ds, path: str, done: set[str]) -> tuple[int, int]:
    """Append each output line of `ds` as its block arrives (synced per block), skipping ids
    already in the file or written before (a retried batch); returns (lines written, tokens
    generated)."""
    keys, written, tokens = set(done), 0, 0
    writer = OutputWriter(path)
    try:
        for block in _blocks(ds):
            for s in block["output_json"]:
                row = json.loads(s)
                key = line_key(row)
                if key in keys:
                    continue
                keys.add(key)
                writer.write(row)
                written += 1
                tokens += sum(len(x["output_ids"]) for x in row.get("samples", [row]))
            writer.sync()
    finally:
        writer.close()
    return written, tokens


def _blocks(ds):
    """ds's output blocks as they finish; a worker's FlexrunError raised as itself (one
    line from the CLI, as without Ray)."""
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except Exception as e:
        cause = flexrun_cause(e)
        if cause is None:
            raise
        raise FlexrunError(f"a Ray worker failed: {cause}") from None
