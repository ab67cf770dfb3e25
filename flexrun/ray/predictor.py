"""FlexrunPredictor: the callable class that `ray.data.Dataset.map_batches` runs in each actor.

One LLM per actor, built once in __init__ (policy "auto": the cost model's placement for this
actor's share of its host, share.py); each call turns a batch's rows into requests exactly as
`flexrun generate` turns JSONL lines into them (jobs.row_item, jobs.plain_request) and adds
the columns output_ids, text and finish_reason (and output_json, the whole output line the
CLI would write, when full_output)."""
from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch

from flexrun.api import LLM
from flexrun.config import FlexrunError, Policy
from flexrun.jobs import Pieces, calls, plain_line, plain_request
from flexrun.jobs.plain import row_item
from flexrun.ray.rows import batch_rows, with_columns
from flexrun.ray.share import (HostShare, actors_per_host, gpu_fraction, planning_profile,
                               shared_budgets)

FAIL_ENV = "FLEXRUN_RAY_FAIL_AFTER"     # "N" or "N:FILE": see GenerateConfig.fail_after


@dataclass
class GenerateConfig:
    """What every actor of a job builds and how it generates (picklable: Ray ships it)."""
    model: str
    device: str | None = None               # default: cuda when the actor sees a GPU
    dtype: str | None = None
    policy: Policy | str | None = "auto"    # auto (also None): the cost model, for this
    #                                         actor's share of its host; resident; a file
    gpu_mem: str | int | None = None        # per GPU
    cpu_mem: str | int | None = None        # the host's: divided among the host's actors
    disk_mem: str | int | None = None       # the host's: divided as well
    offload_dir: str | None = None          # each actor makes its own run directory in it
    compress_weight: bool = False
    compress_cache: bool = False
    profile: str | None = None              # hardware profile JSON (default: the shipped one)
    # generation: what `flexrun generate` takes; a row's own fields win
    max_new_tokens: int | None = None       # a row's cap when it sets no max_tokens (32)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None                 # job seed: rows without one derive theirs by id
    ignore_eos: bool = False
    truncate: bool = False                  # drop the start of prompts too long
    chat_template: str | None = None        # text or file; default: the model's
    # planning: the workload and how many actors share a host
    workload: tuple[int, int, int] | None = None   # (prompt tokens, new tokens, rows per call)
    batch_size: int | None = None           # map_batches' batch_size (rows per call)
    pool_size: int | None = None            # actors in the pool (caps actors per host)
    actors_per_host: int | None = None      # None: from the node's resources and pool_size
    full_output: bool = False               # add "output_json" (logprobs, samples included)
    # fault injection (tests): exit after this many calls; with fail_once, only the first
    # actor to get there (it creates that file) exits. Default: $FLEXRUN_RAY_FAIL_AFTER.
    fail_after: int | None = None
    fail_once: str | None = None

    def plan_workload(self) -> tuple[int, int, int | None]:
        if self.workload is not None:
            return self.workload
        return 512, self.max_new_tokens or 32, self.batch_size


def _fault(cfg: GenerateConfig) -> tuple[int | None, str | None]:
    if cfg.fail_after is not None:
        return cfg.fail_after, cfg.fail_once
    env = os.environ.get(FAIL_ENV)
    if not env:
        return None, None
    n, _, path = env.partition(":")
    return int(n), path or None


def host_share(cfg: GenerateConfig) -> HostShare:
    """This actor's share of its host: from its Ray resources and its node's, or
    cfg.actors_per_host; outside a Ray worker the whole host unless told."""
    try:
        import ray
        in_ray = ray.is_initialized()
    except ImportError:
        in_ray = False
    if not in_ray:
        return HostShare(cfg.actors_per_host or 1)
    ctx = ray.get_runtime_context()
    asked = {r: ctx.get_assigned_resources().get(r, 0.0) for r in ("CPU", "GPU")}
    k = cfg.actors_per_host
    if k is None:
        node = next((n["Resources"] for n in ray.nodes()
                     if n["NodeID"] == ctx.get_node_id()), {})
        k = actors_per_host(node, asked, cfg.pool_size)
    return HostShare(k, gpu_fraction(asked["GPU"]))


class FlexrunPredictor:
    """map_batches(FlexrunPredictor, fn_constructor_kwargs=dict(model=..., ...)): rows with
    "prompt", "input_ids" or "messages" (and any per-row field a JSONL line may set) in;
    output_ids, text, finish_reason added."""

    def __init__(self, config: GenerateConfig | None = None, **kwargs):
        if config is None:
            config = GenerateConfig(**kwargs)
        elif kwargs:
            known = {f.name for f in fields(GenerateConfig)}
            config = GenerateConfig(**{**{k: getattr(config, k) for k in known}, **kwargs})
        self.config = cfg = config
        self.calls = 0
        self.fail_after, self.fail_once = _fault(cfg)
        self.share = host_share(cfg)
        threads = _assigned_cpus()
        if threads:
            torch.set_num_threads(threads)
        gpu, cpu, disk = shared_budgets(cfg.gpu_mem, cfg.cpu_mem, cfg.disk_mem, self.share,
                                        cfg.offload_dir)
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        auto = cfg.policy is None or cfg.policy == "auto"
        with planning_profile(device, self.share, cfg.profile) if auto else nullcontext():
            self.llm = LLM(cfg.model, device=device, policy=cfg.policy, gpu_mem=gpu,
                           cpu_mem=cpu, disk_mem=disk, offload_dir=cfg.offload_dir,
                           dtype=cfg.dtype, compress_weight=cfg.compress_weight,
                           compress_cache=cfg.compress_cache,
                           workload=cfg.plan_workload() if auto else None)
        self.pieces = Pieces(self.llm.tokenizer)

    def __call__(self, batch):
        self.calls += 1
        self._maybe_fail()
        results = self.generate_rows(batch_rows(batch))
        new = {"output_ids": [r["output_ids"] for r in results],
               "text": [r["text"] for r in results],
               "finish_reason": [r["finish_reason"] for r in results]}
        if self.config.full_output:
            new["output_json"] = [json.dumps(r, ensure_ascii=False) for r in results]
        return with_columns(batch, new)

    def generate_rows(self, rows: list[dict]) -> list[dict]:
        """Each row's output line (as `flexrun generate` writes it), in the rows' order."""
        cfg, llm = self.config, self.llm
        items = [row_item(r, "batch", i + 1) for i, r in enumerate(rows)]
        defaults = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                        ignore_eos=cfg.ignore_eos)
        reqs = [plain_request(it, llm, defaults, cfg.max_new_tokens, cfg.seed,
                              cfg.chat_template) for it in items]
        out: list[dict | None] = [None] * len(items)
        for m, group in calls(reqs, llm.spec.max_positions):
            for o in llm.iter_generate([r.prompt for r in group], m,
                                       [r.params for r in group], truncate=cfg.truncate,
                                       names=[r.item.id for r in group]):
                it = group[o.index].item
                out[it.line - 1] = plain_line(it, o, self.pieces.piece)
        return out  # type: ignore[return-value]

    def _maybe_fail(self) -> None:
        if self.fail_after is None or self.calls <= self.fail_after:
            return
        if self.fail_once is not None:
            try:
                os.close(os.open(self.fail_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return              # another actor (or this one, before) failed already
        os._exit(1)                 # as a killed worker: no cleanup, no reply

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _assigned_cpus() -> int | None:
    """Whole CPUs Ray gave this actor (torch's thread count), None outside Ray."""
    try:
        import ray
        if not ray.is_initialized():
            return None
        n = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    except (ImportError, RuntimeError):
        return None
    return max(1, int(n)) if n else None


def map_generate(ds, config: GenerateConfig, workers: int = 1, num_cpus: float = 1,
                 num_gpus: float = 0, batch_size: int = 64):
    """ds.map_batches with a pool of `workers` FlexrunPredictor actors, each asking Ray for
    num_cpus / num_gpus; the pool size and batch size go to the actors' plans."""
    if workers < 1:
        raise FlexrunError(f"workers must be >= 1, got {workers}")
    cfg = GenerateConfig(**{f.name: getattr(config, f.name) for f in fields(config)})
    cfg.pool_size, cfg.batch_size = workers, batch_size
    from ray.data import ActorPoolStrategy
    return ds.map_batches(FlexrunPredictor, fn_constructor_kwargs={"config": cfg},
                          compute=ActorPoolStrategy(size=workers), batch_size=batch_size,
                          num_cpus=num_cpus, num_gpus=num_gpus or None)
