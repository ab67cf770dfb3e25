"""Several GPUs: one process per pipeline stage over torch.distributed.

Two ways in:
- torchrun (RANK, WORLD_SIZE, MASTER_ADDR set): every process builds its `LLM(num_gpus=N)`, which
  joins the group and loads only its stage; all ranks run the same program (SPMD) and all end
  with the outputs.
- otherwise `LLM(num_gpus=N)` is a driver: it spawns N workers on a free localhost port, each an
  `LLM` of the first kind, and sends them each block; the last stage sends the results back.
NCCL on CUDA (NVLink multicast kept off: NCCL_NVLS_ENABLE=0), gloo on the CPU.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait as wait_any
from pathlib import Path

import torch
import torch.distributed as dist

from .config import FlexrunError, Policy
from .engine.distributed import StageComm
from .engine.pipeline import BatchState
from .engine.sampling import Sampler
from .engine.stages import plan_stages
from .hardware import default_profile
from .storage import remove_stale_runs


def torchrun_env() -> bool:
    """True when launched by torchrun (or anything that sets its variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def resolve_num_gpus(num_gpus: int | None) -> int:
    """num_gpus as given, else WORLD_SIZE under torchrun, else 1."""
    if num_gpus is None:
        return int(os.environ["WORLD_SIZE"]) if torchrun_env() else 1
    if not isinstance(num_gpus, int) or num_gpus < 1:
        raise FlexrunError(f"--gpus must be an integer >= 1, got {num_gpus!r}")
    return num_gpus


def _timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("FLEXRUN_DIST_TIMEOUT", "1800")))


def check_devices(n: int, device: torch.device) -> None:
    if device.type == "cuda" and n > torch.cuda.device_count():
        raise FlexrunError(f"--gpus {n} exceeds the {torch.cuda.device_count()} visible CUDA "
                           "device(s): pass a smaller --gpus or set CUDA_VISIBLE_DEVICES")


@dataclass
class StageInfo:
    """This process's place in a distributed run."""
    rank: int
    world: int
    comm: StageComm
    owns_group: bool

    def any(self, flag: bool) -> bool:
        return self.comm.any(flag)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def join_group(n: int, device: torch.device) -> tuple[StageInfo, torch.device]:
    """Join (or reuse) the process group from the torchrun variables; returns the stage and
    its compute device (cuda:LOCAL_RANK on CUDA)."""
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world != n:
        raise FlexrunError(f"--gpus {n} but WORLD_SIZE is {world}: launch {n} processes "
                           "(torchrun --nproc-per-node N) or drop --gpus")
    os.environ["NCCL_NVLS_ENABLE"] = "0"         # NVLink multicast stays off, always
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        if local >= torch.cuda.device_count():
            raise FlexrunError(f"rank {rank} wants GPU {local} but only "
                               f"{torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method="env://", rank=rank, world_size=world,
                                timeout=_timeout())
    comm = StageComm(rank, world, device if device.type == "cuda" else torch.device("cpu"),
                     dist.new_group(list(range(world))))
    comm.warm_up()
    return StageInfo(rank, world, comm, owns), device


def plan_policies(llm, policy) -> tuple[list[range], list[Policy]]:
    """The stages (units cut by weight bytes) and one policy per stage: `policy` for every
    stage, a list of one per stage, or "auto": the cost model's per stage (stageplan.py).

    The cut depends only on the model, dtype and whether weights may be compressed, so the
    driver and every worker (or torchrun rank) compute the same one."""
    n = llm.num_gpus
    given = None
    if isinstance(policy, (list, tuple)):
        if len(policy) != n:
            raise FlexrunError(f"{len(policy)} policies for --gpus {n}: give one per stage")
        given = [llm._with_flags(Policy.from_dict(p.to_dict()) if isinstance(p, Policy) else p)
                 for p in policy]
    elif policy != "auto":
        one = llm._with_flags(policy)
        given = [Policy.from_dict(one.to_dict()) for _ in range(n)]
    hint = llm.compress_weight or any(p.compress_weight for p in given or ())
    stages = plan_stages(llm.spec, llm.dtype, n, hint)
    if given is None:
        from .stageplan import search_stages
        plan = search_stages(llm.spec, default_profile(llm.device), stages,
                             llm.auto_prompt_len, llm.auto_gen_len, llm.gpu_mem, llm.cpu_mem,
                             llm.disk_mem, llm.device.type,
                             torch.tensor([], dtype=llm.dtype).element_size(),
                             num_prompts=llm.auto_num_prompts,
                             compress_weight=llm.compress_weight,
                             compress_cache=llm.compress_cache)
        given = [llm._with_flags(p) for p in plan.policies]
    shapes = {(p.gpu_batch_size, p.num_gpu_batches) for p in given}
    if len(shapes) > 1:
        raise FlexrunError("the stages' policies must share gpu_batch_size and "
                           f"num_gpu_batches (micro-batches flow through all), got {sorted(shapes)}")
    return stages, given


def setup(llm, n: int, kwargs: dict) -> None:
    """Make `llm` a stage (torchrun variables set) or the driver of n spawned stages."""
    check_devices(n, llm.device)
    if torchrun_env():
        llm.dist, llm.device = join_group(n, llm.device)
        llm.units = llm.stages[llm.dist.rank]
        llm.policy = llm.stage_policies[llm.dist.rank]
        if llm.trace_path:
            llm.trace_path = f"{llm.trace_path}.rank{llm.dist.rank}"
        return
    llm._check_budget(None, None)        # fail before spawning anything
    llm.batch_device = torch.device("cpu")
    llm.pipeline = WorkerGroup(n, kwargs, llm.device)
    llm.stats.weights_split = llm.pipeline.weights_split


# ---- the driver's side ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerGroup:
    """N spawned stage processes; `run_block` has Pipeline.run_block's contract."""

    def __init__(self, n: int, kwargs: dict, device: torch.device):
        os.environ["NCCL_NVLS_ENABLE"] = "0"     # the workers inherit it: no NVLink multicast
        self.offload_dir = kwargs.get("offload_dir")
        self.peaks, self.broken = (0, 0), False
        ctx = mp.get_context("spawn")
        port, self.procs, self.conns = free_port(), [], []
        try:
            for r in range(n):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(r, n, port, kwargs, child),
                                name=f"flexrun-stage{r}", daemon=True)
                p.start()
                child.close()
                self.procs.append(p)
                self.conns.append(parent)
            ready = self._replies()                 # every stage loaded
            tiers = {t: sum(r["bytes"][t] for r in ready) for t in ready[0]["bytes"]}
            total = max(sum(tiers.values()), 1)
            self.weights_split = {t: round(100.0 * v / total, 2) for t, v in tiers.items()}
        except BaseException:
            self.close(wait=0)
            raise

    def run_block(self, batches: list[BatchState], max_new_tokens: int, sampler: Sampler,
                  on_step=None) -> None:
        msg = ("block", ([_pack(b) for b in batches], max_new_tokens, sampler.params))
        for c in self.conns:
            c.send(msg)
        replies = self._replies()
        for b, (outputs, done, logits) in zip(batches, replies[-1]["batches"]):
            b.outputs[:], b.done[:] = outputs, done
            b.logits = None if logits is None else torch.from_numpy(logits)
        for step, t in enumerate(replies[-1]["marks"]):
            if on_step is not None:
                on_step(step, t)        # perf_counter is one clock for the whole host
        self.peaks = (max(r["peak"][0] for r in replies), sum(r["peak"][1] for r in replies))

    def peak_bytes(self) -> tuple[int, int]:
        return self.peaks

    def _replies(self) -> list:
        """One reply per stage; a stage's error (or death) fails the whole group."""
        out: list = [None] * len(self.conns)
        while any(x is None for x in out):
            waiting = {c: r for r, c in enumerate(self.conns) if out[r] is None}
            sentinels = {self.procs[r].sentinel: r for r in waiting.values()}
            for ready in wait_any(list(waiting) + list(sentinels)):
                r = waiting.get(ready, sentinels.get(ready))
                if out[r] is not None:
                    continue
                try:
                    kind, body = self.conns[r].recv()
                except (EOFError, OSError):
                    self.procs[r].join(1)
                    raise FlexrunError(f"pipeline stage {r} exited unexpectedly (exit code "
                                       f"{self.procs[r].exitcode})") from None
                if kind == "error":
                    self.broken = True
                    message, user_error = body
                    if user_error:
                        raise FlexrunError(message)
                    raise RuntimeError(f"pipeline stage {r} failed:\n{message}")
                out[r] = body
        return out

    def close(self, wait: float = 30.0) -> None:
        """Stop the workers (they remove their offload files); kill any that hang."""
        if self.broken:
            wait = 0
        for c in self.conns:
            try:
                c.send(("close", None))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + wait
        for p in self.procs:
            p.join(max(deadline - time.monotonic(), 0))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        for c in self.conns:
            c.close()
        self.procs, self.conns = [], []
        if self.offload_dir:
            remove_stale_runs(Path(self.offload_dir))   # of workers that had to be killed


def _pack(b: BatchState) -> dict:
    return {"indices": b.indices, "ids": b.ids.cpu().numpy(), "valid": b.valid.cpu().numpy(),
            "prompt_len": b.prompt_len, "next_pos": b.next_pos.cpu().numpy(),
            "padded": b.padded, "keep_logits": b.keep_logits}


def _unpack(d: dict, device: torch.device) -> BatchState:
    rows = len(d["indices"])
    return BatchState(indices=d["indices"], ids=torch.from_numpy(d["ids"]).to(device),
                      valid=torch.from_numpy(d["valid"]).to(device), prompt_len=d["prompt_len"],
                      next_pos=torch.from_numpy(d["next_pos"]).to(device), padded=d["padded"],
                      keep_logits=d["keep_logits"], outputs=[[] for _ in range(rows)],
                      done=[False] * rows)


# ---- a worker process -----------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, kwargs: dict, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # the driver decides when to stop
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if kwargs.get("device") == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from .api import LLM
    llm = None
    try:
        llm = LLM(**kwargs)
        conn.send(("ready", {"units": list(llm.units), "bytes": llm.weights.bytes_per_tier()}))
        while True:
            kind, body = conn.recv()
            if kind != "block":
                break
            conn.send(("done", _run_block(llm, *body)))
    except BaseException as e:
        user = isinstance(e, FlexrunError)
        try:
            conn.send(("error", (str(e) if user else traceback.format_exc(), user)))
        except (OSError, ValueError):
            pass
    finally:
        if llm is not None:
            llm.close()


def _run_block(llm, packed: list, max_new_tokens: int, params) -> dict:
    batches = [_unpack(d, llm.device) for d in packed]
    sampler = Sampler(params, llm.spec.eos_token_ids)
    sync = torch.cuda.synchronize if llm.device.type == "cuda" else (lambda: None)
    marks: list[float] = []
    llm.pipeline.run_block(batches, max_new_tokens, sampler,
                           on_step=lambda s: (sync(), marks.append(time.perf_counter())))
    out = None
    if llm.pipeline.last:
        out = [(b.outputs, b.done, None if b.logits is None else b.logits.numpy())
               for b in batches]
    return {"batches": out, "marks": marks, "peak": llm.pipeline.peak_bytes()}

