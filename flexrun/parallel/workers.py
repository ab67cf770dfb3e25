"""The driver of a pipeline run without torchrun: N spawned stage processes.

`WorkerGroup` has Pipeline's contract (run_block, peak_bytes, close): it sends each block's
batches to every worker over a pipe, each worker (an `LLM` on torchrun-style variables, see
parallel.py) runs its stage, and the last stage sends the outputs back. A worker's error or
death fails the run at once instead of hanging it.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import sys
import time
import traceback
from multiprocessing.connection import wait as wait_any
from pathlib import Path
from typing import Any, Callable

import torch

from flexrun.config import FlexrunError
from flexrun.engine.batch_state import BatchState
from flexrun.engine.sampling import Sampler
from flexrun.memory.disk import remove_stale_runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerGroup:
    """N spawned stage processes; `run_block` has Pipeline.run_block's contract."""

    def __init__(self, n: int, build: Callable[..., Any], kwargs: dict, device: torch.device):
        """n stage processes, each running `build(**kwargs)` (the LLM class: a stage of a
        torchrun-style launch) under its own RANK / WORLD_SIZE."""
        os.environ["NCCL_NVLS_ENABLE"] = "0"     # the workers inherit it: no NVLink multicast
        self.offload_dir = kwargs.get("offload_dir")
        self.peaks, self.broken = (0, 0), False
        ctx = mp.get_context("spawn")
        port, self.procs, self.conns = free_port(), [], []
        try:
            for r in range(n):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(r, n, port, build, kwargs, child),
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
        msg = ("block", ([_pack(b) for b in batches], max_new_tokens, sampler.config()))
        for r, c in enumerate(self.conns):
            try:
                c.send(msg)
            except OSError:             # (a broken pipe: the stage is gone)
                raise self._exited(r) from None
        replies = self._replies()
        for b, (outputs, done, finish, logprobs, prompt_lp, logits) in zip(
                batches, replies[-1]["batches"]):
            b.outputs[:], b.done[:], b.finish[:], b.logprobs[:] = outputs, done, finish, logprobs
            b.prompt_lp = prompt_lp
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
                    raise self._exited(r) from None
                if kind == "error":
                    self.broken = True
                    r, body = self._cause(r, body, out)
                    message, user_error = body
                    if user_error:
                        raise FlexrunError(message)
                    raise RuntimeError(f"pipeline stage {r} failed:\n{message}")
                out[r] = body
        return out

    def _cause(self, r: int, body, out: list) -> tuple[int, tuple]:
        """(stage, error) to report when stage r failed: a stage fails on the connection a
        failed or dead peer lost, so a peer's own error waiting to be read comes first, then a
        peer that died without one."""
        for d, c in enumerate(self.conns):
            if d != r and out[d] is None and c.poll():
                try:
                    kind, reply = c.recv()
                except (EOFError, OSError):
                    raise self._exited(d) from None
                if kind == "error":
                    return d, reply
                out[d] = reply
        dead = [d for d, p in enumerate(self.procs) if d != r and out[d] is None
                and not p.is_alive()]
        if dead:
            raise self._exited(dead[0])
        return r, body

    def _exited(self, r: int) -> FlexrunError:
        self.broken = True          # the other stages may wait on the dead one: no waiting
        self.procs[r].join(1)
        return FlexrunError(f"pipeline stage {r} exited unexpectedly (exit code "
                            f"{self.procs[r].exitcode})")

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
            "padded": b.padded, "keep_logits": b.keep_logits, "prompt_lp_k": b.prompt_lp_k}


def _unpack(d: dict, device: torch.device) -> BatchState:
    rows = len(d["indices"])
    return BatchState(indices=d["indices"], ids=torch.from_numpy(d["ids"]).to(device),
                      valid=torch.from_numpy(d["valid"]).to(device), prompt_len=d["prompt_len"],
                      next_pos=torch.from_numpy(d["next_pos"]).to(device), padded=d["padded"],
                      keep_logits=d["keep_logits"], outputs=[[] for _ in range(rows)],
                      done=[False] * rows, prompt_lp_k=d["prompt_lp_k"])


# ---- a worker process -----------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, build: Callable[..., Any], kwargs: dict,
            conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # the driver decides when to stop
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if kwargs.get("device") == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    llm = None
    try:
        llm = build(**kwargs)
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
    sampler = Sampler(params, llm.spec.eos_token_ids, decode=llm.decode)
    sync = torch.cuda.synchronize if llm.device.type == "cuda" else (lambda: None)
    marks: list[float] = []
    llm.pipeline.run_block(batches, max_new_tokens, sampler,
                           on_step=lambda s: (sync(), marks.append(time.perf_counter())))
    out = None
    if llm.pipeline.last:
        out = [(b.outputs, b.done, b.finish, b.logprobs, b.prompt_lp,
                None if b.logits is None else b.logits.numpy()) for b in batches]
    return {"batches": out, "marks": marks, "peak": llm.pipeline.peak_bytes()}

