"""Several GPUs: one process per pipeline stage over torch.distributed.

Two ways in:
- torchrun (RANK, WORLD_SIZE, MASTER_ADDR set): every process builds its `LLM(num_gpus=N)`, which
  joins the group and loads only its stage; all ranks run the same program (SPMD) and all end
  with the outputs.
- otherwise `LLM(num_gpus=N)` is a driver: it spawns N workers (workers.py), each an `LLM` of
  the first kind, and sends them each block; the last stage sends the results back.
NCCL on CUDA (NVLink multicast kept off: NCCL_NVLS_ENABLE=0), gloo on the CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from flexrun.config import FlexrunError, Policy
from flexrun.parallel.stage_pipeline import StageComm
from flexrun.plan.stages import plan_stages
from flexrun.plan.hardware import default_profile


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


def backend(device: torch.device) -> str:
    """nccl on CUDA, gloo on the CPU. FLEXRUN_DIST_BACKEND=gloo keeps CUDA compute but sends
    through host memory and lets stages share a GPU (rank r on cuda:r % count): the way to run
    every stage on one GPU, e.g. to check a multi-GPU run's tokens on a single-GPU machine."""
    forced = os.environ.get("FLEXRUN_DIST_BACKEND") or None
    if forced not in (None, "nccl", "gloo"):
        raise FlexrunError(f"FLEXRUN_DIST_BACKEND must be nccl or gloo, got {forced!r}")
    if forced == "nccl" and device.type != "cuda":
        raise FlexrunError("FLEXRUN_DIST_BACKEND=nccl needs --device cuda")
    return forced or ("nccl" if device.type == "cuda" else "gloo")


def check_devices(n: int, device: torch.device) -> None:
    if device.type == "cuda" and backend(device) == "nccl" and n > torch.cuda.device_count():
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
    be = backend(device)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world != n:
        raise FlexrunError(f"--gpus {n} but WORLD_SIZE is {world}: launch {n} processes "
                           "(torchrun --nproc-per-node N) or drop --gpus")
    os.environ["NCCL_NVLS_ENABLE"] = "0"         # NVLink multicast stays off, always
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        if be == "gloo":
            local %= torch.cuda.device_count()
        elif local >= torch.cuda.device_count():
            raise FlexrunError(f"rank {rank} wants GPU {local} but only "
                               f"{torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(be, init_method="env://", rank=rank, world_size=world,
                                timeout=_timeout())
    on_gpu = dist.get_backend() == "nccl"           # (a group made by the caller may differ)
    comm = StageComm(rank, world, device if on_gpu else torch.device("cpu"),
                     dist.new_group(list(range(world))),
                     # receives posted when needed (FLEXRUN_DIST_LAZY=1: on gloo too, tests)
                     lazy=on_gpu or os.environ.get("FLEXRUN_DIST_LAZY") == "1")
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
        from flexrun.plan.stage_search import search_stages
        plan = search_stages(llm.spec, default_profile(llm.device), stages,
                             llm.auto_prompt_len, llm.auto_gen_len, llm.gpu_mem, llm.cpu_mem,
                             llm.disk_mem, llm.device.type,
                             llm.dtype.itemsize,
                             num_prompts=llm.auto_num_prompts,
                             compress_weight=llm.compress_weight,
                             compress_cache=llm.compress_cache)
        given = [llm._with_flags(p) for p in plan.policies]
    shapes = {(p.gpu_batch_size, p.num_gpu_batches) for p in given}
    if len(shapes) > 1:
        raise FlexrunError("the stages' policies must share gpu_batch_size and num_gpu_batches "
                           f"(micro-batches flow through all), got {sorted(shapes)}")
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
    from flexrun.parallel.workers import WorkerGroup
    # each worker builds its stage with llm's own class (no import of the api from here)
    llm.pipeline = WorkerGroup(n, type(llm), kwargs, llm.device)
    llm.stats.weights_split = llm.pipeline.weights_split
