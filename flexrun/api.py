"""The Python API: `LLM(model, ...)` and `llm.generate(prompts, ...)`."""
from __future__ import annotations

import resource
import time
from typing import Callable, Iterator, Sequence

import torch

from flexrun.config import FlexrunError, Policy, SamplingParams, parse_size
from flexrun.engine.batch_state import BatchState
from flexrun.engine.pipeline import Pipeline
from flexrun.engine.requests import (RequestOutput, Sample, fit_positions,
                                     forced_requests, make_batch, params_per_prompt,
                                     progress_bar, prompt_logprob_list,
                                     request_rows, row_sample)
from flexrun.engine.sampling import Sampler
from flexrun.engine.trace import Tracer
from flexrun.engine.budget import BudgetCheck, rss_anon, settled_rss
from flexrun.engine.device import default_device, resolve_dtype as _resolve_dtype
from flexrun.engine.runstats import RunStats
from flexrun.plan.auto import AutoPlan, default_workload, plan_for_llm
from flexrun.plan.footprint import check_budget
from flexrun.plan.placement import Placed, place_weights
from flexrun.models.chat import chat_prompt_ids
from flexrun.models.llama import model_for
from flexrun.models.loader import open_checkpoint
from flexrun.memory.disk import DiskTier
from flexrun.memory.storage import TieredStore


class LLM:
    """A model placed on GPU / CPU / disk by a Policy, ready to generate for many prompts."""

    def __init__(self, model: str, device: str | None = None,
                 policy: Policy | str | list[Policy] | None = None,
                 gpu_mem: str | int | None = None, cpu_mem: str | int | None = None,
                 offload_dir: str | None = None, dtype: str | torch.dtype | None = None,
                 trace: str | None = None, disk_mem: str | int | None = None,
                 compress_weight: bool = False, compress_cache: bool = False,
                 workload: tuple[int, int, int] | None = None,
                 num_gpus: int | None = None, expert_stats: str | None = None):
        """policy: "auto" (default, also None): the cost model's plan (plan/auto.py) for
        `workload` = (longest prompt, new tokens, prompts), by default 512 + 32 tokens cut to
        the model's positions and any number of prompts: the search runs here, since weights
        are placed here; prompts much longer than planned for can exceed the budgets, so pass
        workload= for them. Budgets not given are 90% of the GPU's free memory, 80% of the
        available RAM and the offload directory's free space. "resident": every tensor on the
        compute device, one block of 8 prompts (Policy()); a Policy or a policy file: as given.
        gpu_mem / cpu_mem, when given, are also checked after every block against the
        measured peaks (engine/budget.py): one warning line when one is exceeded.

        num_gpus > 1: pipeline stages in one process per GPU (docs/parallel.md); under
        torchrun it defaults to WORLD_SIZE and this process runs its own stage. policy is
        then one Policy for every stage, a list of one per stage, or "auto" (a cost-model
        placement per stage, each with an even share of cpu_mem / disk_mem).

        expert_stats: a MoE model's routing counts of an earlier run (save_expert_stats):
        each layer's GPU places go to its busiest experts; ignored while the file is absent."""
        from flexrun.parallel.launch import resolve_num_gpus
        self.num_gpus = resolve_num_gpus(num_gpus)
        self.device = torch.device(device or default_device())
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise FlexrunError("--device cuda asked for but no CUDA GPU is visible: use "
                               "--device cpu")
        self.gpu_mem, self.cpu_mem = parse_size(gpu_mem), parse_size(cpu_mem)
        self.disk_mem, self.offload_dir = parse_size(disk_mem), offload_dir
        held = rss_anon()
        self.ckpt = open_checkpoint(model)
        self.ckpt_held = max(0, settled_rss() - held)   # its tokenizer: counted by the plan
        self.spec = self.ckpt.spec
        self.dtype = _resolve_dtype(dtype, self.device, self.spec.family)
        self.tokenizer = self.ckpt.tokenizer
        self.compress_weight, self.compress_cache = compress_weight, compress_cache
        if expert_stats and not self.spec.num_experts:
            raise FlexrunError(f"--expert-stats is for mixture-of-experts models; {model} is "
                               "dense: leave it out")
        self.expert_stats = expert_stats
        # policy="auto" plans for (longest prompt, max_new_tokens, prompts)
        self.auto_prompt_len, self.auto_gen_len, self.auto_num_prompts = \
            workload or default_workload(self.spec.max_positions)
        self.plan: AutoPlan | None = None           # the search's result, for policy="auto"
        policy = "auto" if policy is None else policy
        self.stages = [range(self.spec.num_units)]   # unit ranges of the pipeline stages
        if self.num_gpus > 1:
            from flexrun.parallel.launch import check_devices, plan_policies
            check_devices(self.num_gpus, self.device)    # before a search that needs them
            self.stages, self.stage_policies = plan_policies(self, policy)
        else:
            self.stage_policies = [self._initial_policy(policy)]
        self.policy = self.stage_policies[0]          # this process's (its stage's, below)
        self.trace_path, self.tracer = trace, None
        self.disk = None
        self.pipeline = None
        self.stats = RunStats()
        self.share_prefill = True                    # n samples of a prompt: one prefill
        self.units = self.stages[0]                  # the units this process runs
        self.dist = None                             # this process's stage (torch.distributed)
        self.budget: BudgetCheck | None = None
        try:
            if self.num_gpus > 1:
                from flexrun.parallel.launch import setup
                setup(self, self.num_gpus, dict(
                    model=model, device=self.device.type, policy=self.stage_policies,
                    gpu_mem=gpu_mem, cpu_mem=cpu_mem, offload_dir=offload_dir, dtype=self.dtype,
                    trace=trace, disk_mem=disk_mem, compress_weight=compress_weight,
                    compress_cache=compress_cache, num_gpus=self.num_gpus))
                if self.pipeline is not None:   # the driver: stages run in spawned workers
                    self.trace_path = None          # (each writes TRACE.rank<r>)
                    return
            self.tracer = Tracer(trace is not None, self.device)
            if self.num_gpus == 1:       # (a stage's peaks are its worker's)
                self.budget = BudgetCheck(self.device, self.gpu_mem, self.cpu_mem)
            if offload_dir is not None or _needs_disk(self.policy):
                if offload_dir is None:
                    raise FlexrunError("the policy puts data on disk: pass --offload-dir DIR")
                self.disk = DiskTier(offload_dir)
            self._check_budget(prompt_len=None, gen_len=None)
            self.weights = TieredStore(self.device, self.disk, self.policy.pin_weights)
            placed = self._place_weights()
            kind, extra = Pipeline, {"units": self.units}
            if self.dist is not None:
                from flexrun.parallel.stage_pipeline import StagePipeline
                kind, extra["comm"] = StagePipeline, self.dist.comm
            self.pipeline = kind(self.spec, model_for(self.spec), self.weights, self.policy,
                                 self.device, self.dtype, self.disk, self.tracer, **extra)
            if self.pipeline.experts is not None and placed.hot:
                self.pipeline.experts.stage_all = False     # off-device experts are cold
        except BaseException:
            self.close()
            raise

    # ---- setup ------------------------------------------------------------------------------
    def _initial_policy(self, policy) -> Policy:
        """The policy of a one-process run, with compress_weight / compress_cache applied."""
        if isinstance(policy, (list, tuple)):
            if len(policy) != 1:
                raise FlexrunError(f"{len(policy)} policies for one GPU: pass --gpus "
                                   f"{len(policy)} (one policy per pipeline stage)")
            policy = policy[0]
        if policy == "auto":
            self.plan = plan_for_llm(self)
            policy = self.plan.result.policy
        return self._with_flags(policy)

    def _with_flags(self, policy: Policy | str | None) -> Policy:
        """A Policy (None or "resident": all resident; str: a policy file) with the
        compression flags."""
        if not isinstance(policy, Policy):
            policy = Policy() if policy in (None, "resident") else Policy.load(policy)
        policy.compress_weight |= self.compress_weight
        policy.compress_cache |= self.compress_cache
        g = self.ckpt.native_group      # --compress-weight on a Q4 GGUF: its own blocks of
        if self.compress_weight and g and policy.quant_bits == 4 \
                and policy.quant_group == Policy().quant_group:  # 32, no second rounding
            policy.quant_group = g      # (a Policy asking for compress_weight keeps its own)
        return policy

    def _check_budget(self, prompt_len, gen_len) -> None:
        """Every stage (this process's only, in a stage) within its budgets: --gpu-mem per GPU,
        an even share of --cpu-mem and --disk-mem (one host)."""
        n = len(self.stages)
        share = lambda x: None if x is None else x // n   # noqa: E731
        for i, (units, policy) in enumerate(zip(self.stages, self.stage_policies)):
            if self.dist is None or i == self.dist.rank:
                check_budget(self.spec, policy, self.device, self.dtype, self.gpu_mem,
                             share(self.cpu_mem), share(self.disk_mem), prompt_len, gen_len,
                             units, f"pipeline stage {i}" if n > 1 else "")

    @property
    def batch_device(self) -> torch.device:
        """Where batch state lives: the compute device, or the host for the driver of spawned
        stage workers (they move it to their own GPUs)."""
        if self.num_gpus > 1 and self.dist is None:
            return torch.device("cpu")
        return self.device

    @property
    def is_main(self) -> bool:
        """False on the ranks > 0 of a torchrun launch (rank 0 writes the outputs)."""
        return self.dist is None or self.dist.rank == 0

    def save_expert_stats(self, path: str) -> None:
        """Write the tokens routed to each expert of each layer so far (a MoE model run in
        this process), for a later run's placement (expert_stats=)."""
        model = getattr(self.pipeline, "model", None)
        if getattr(model, "moe_stats", None) is None:
            raise FlexrunError("--expert-stats needs a mixture-of-experts model run in one "
                               "process (not pipeline stages)")
        model.moe_stats.save(path, self.spec.family)

    def any_rank(self, flag: bool) -> bool:
        """flag, agreed by every rank of a torchrun launch (True if any rank says so)."""
        return flag if self.dist is None else self.dist.any(flag)

    def _place_weights(self) -> Placed:
        placed = place_weights(self.ckpt, self.policy, self.weights, self.device, self.dtype,
                               self.units, self.expert_stats)
        self.stats.weights_split = placed.weights_split
        if self.policy.compress_weight:
            self.stats.weight_quant_s = placed.quant_s
            self.stats.weight_quant_cached = placed.quant_cached
        return placed

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 32,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                 progress: bool = False, forced: list[list[int]] | None = None
                 ) -> list[RequestOutput]:
        """Generate for every prompt; results in prompt order. sampling: one SamplingParams
        for all prompts or one per prompt; forced: each prompt's given next tokens."""
        outs: list[RequestOutput | None] = [None] * len(prompts)
        for o in self.iter_generate(prompts, max_new_tokens, sampling, progress, forced=forced):
            outs[o.index] = o
        return outs  # type: ignore[return-value]

    def score_decode(self, sequences: Sequence[Sequence[int]], prefill: int = 32
                     ) -> list[list[float]]:
        """Teacher forcing: each sequence's first `prefill` tokens are prefilled, every later
        token is fed to a decode step reading the KV cache as generation does (compressed or
        not). Per sequence, the log-probability of each token after the prefill."""
        prompts, params, forced = forced_requests(sequences, prefill)
        outs = self.generate(prompts, max(len(f) for f in forced), params, forced=forced)
        return [[t.logprob for t in o.samples[0].logprobs] for o in outs]

    def iter_generate(self, prompts, max_new_tokens: int = 32,
                      sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                      progress: bool = False,
                      on_block_done: Callable[[], None] | None = None, truncate: bool = False,
                      names: Sequence | None = None, forced: list[list[int]] | None = None
                      ) -> Iterator[RequestOutput]:
        """Yield outputs block by block as they finish (longest prompts first).

        truncate: drop the start of prompts too long for the model's positions instead of
        failing; names: how errors refer to prompts (default: their index); forced: each
        prompt's given next tokens (teacher forcing, score_decode)."""
        if max_new_tokens < 1:
            raise FlexrunError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        params = params_per_prompt(sampling, len(prompts))
        names = list(names) if names is not None else list(range(len(prompts)))
        ids = [self._encode(p, names[i]) for i, p in enumerate(prompts)]
        limits = [min(p.max_tokens or max_new_tokens, max_new_tokens) for p in params]
        fit_positions(ids, limits, self.spec.max_positions, names, truncate)
        self._check_budget(max((len(x) for x in ids), default=0), max(limits, default=1))
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        rows, table = request_rows(order, params, limits, forced)
        sampler = Sampler(table, self.spec.eos_token_ids, decode=self.decode)
        share = self.share_prefill and self.num_gpus == 1
        bs, block = self.policy.gpu_batch_size, self.policy.block_size
        bar = progress_bar(progress, len(ids))
        done: dict[int, dict[int, Sample]] = {}
        prompt_lps: dict[int, list] = {}
        for start in range(0, len(rows), block):
            members = list(range(start, min(start + block, len(rows))))
            k = max((params[rows[m][0]].prompt_logprobs for m in members
                     if params[rows[m][0]].prompt_logprobs is not None), default=None)
            gen = max(limits[rows[m][0]] for m in members)    # the block's longest cap
            batches = [make_batch(members[i:i + bs], rows, ids, gen,
                                  self.spec.pad_token_id or 0, self.batch_device, share, k)
                       for i in range(0, len(members), bs)]
            self._run_block(batches, gen, sampler)
            finished = []
            for b in batches:
                for n, r in enumerate(b.indices):
                    i, j = rows[r]
                    sampler.release(r)
                    done.setdefault(i, {})[j] = row_sample(b, n, params[i], self.decode)
                    if params[i].prompt_logprobs is not None and i not in prompt_lps:
                        prompt_lps[i] = prompt_logprob_list(b, n, ids[i],
                                                            params[i].prompt_logprobs)
                    if len(done[i]) == params[i].n:
                        finished.append(i)
            for i in finished:
                got = done.pop(i)
                samples = [got[j] for j in range(params[i].n)]
                s0 = samples[0]
                yield RequestOutput(i, ids[i], s0.output_ids, s0.text, s0.finish_reason,
                                    samples, prompt_lps.pop(i, None))
            if bar is not None:
                bar.update(len(finished))
            if on_block_done is not None:
                on_block_done()
        if bar is not None:
            bar.close()

    def chat(self, conversations: Sequence[list[dict]], max_new_tokens: int = 32,
             sampling: SamplingParams | Sequence[SamplingParams] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             progress: bool = False) -> list[RequestOutput]:
        """Generate a reply to each conversation (a list of {"role", "content"} messages),
        rendered with the model's chat template (or chat_template: text or a file)."""
        ids = [self.chat_prompt_ids(c, chat_template, add_generation_prompt)
               for c in conversations]
        return self.generate(ids, max_new_tokens, sampling, progress)

    def chat_prompt_ids(self, messages: list[dict], chat_template: str | None = None,
                        add_generation_prompt: bool = True, **extra) -> list[int]:
        """A conversation's prompt ids: the chat template rendered as transformers'
        apply_chat_template does, encoded without the tokenizer's own special tokens."""
        return chat_prompt_ids(self.ckpt, messages, chat_template=chat_template,
                               add_generation_prompt=add_generation_prompt, **extra)

    def decode(self, ids: list[int]) -> str | None:
        """Token ids as text (special tokens skipped); None without a tokenizer."""
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def prompt_logits(self, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Logits (len, vocab) at every position of each token-id prompt (for scoring)."""
        ids = [self._encode(p, i) for i, p in enumerate(prompts)]
        self._check_budget(max(len(x) for x in ids), 1)
        sampler = Sampler(SamplingParams(), [])
        out: list[torch.Tensor | None] = [None] * len(ids)
        bs, block = self.policy.gpu_batch_size, self.policy.block_size
        for start in range(0, len(ids), block):
            members = list(range(start, min(start + block, len(ids))))
            rows = [(i, 0) for i in range(len(ids))]
            batches = [make_batch(members[i:i + bs], rows, ids, 1, self.spec.pad_token_id or 0,
                                  self.batch_device, False, None)
                       for i in range(0, len(members), bs)]
            for b in batches:
                b.keep_logits = True
            self._run_block(batches, 1, sampler)
            for b in batches:
                for row, idx in enumerate(b.indices):
                    out[idx] = b.logits[row, b.prompt_len - len(ids[idx]):]
        return out  # type: ignore[return-value]

    def _run_block(self, batches: list[BatchState], max_new_tokens: int, sampler) -> None:
        sync = torch.cuda.synchronize if self.batch_device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        marks = []

        def on_step(step: int, t: float | None = None) -> None:
            if not marks:       # the prefill's end; later steps are not waited for
                sync()
            marks.append(time.perf_counter() if t is None else t)
        self.pipeline.run_block(batches, max_new_tokens, sampler, on_step=on_step)
        sync()
        t1 = time.perf_counter()
        gpu, rss = self.pipeline.peak_bytes()
        self.stats.add_block(batches, t0, marks[0] if marks else t1, t1, gpu,
                             max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
        if self.budget is not None:
            self.budget.after_block()

    def _encode(self, p, i: int) -> list[int]:
        if isinstance(p, str):
            if self.tokenizer is None:
                raise FlexrunError(f"prompt {i!r} is text but {self.ckpt.source} has no tokenizer: "
                                   "pass token ids (input_ids) instead")
            ids = self.tokenizer.encode(p).ids
        else:
            ids = [int(x) for x in p]
        bad = [x for x in ids if not 0 <= x < self.spec.vocab_size]
        if bad:
            raise FlexrunError(f"prompt {i!r} has token id {bad[0]} outside the vocabulary "
                               f"(0..{self.spec.vocab_size - 1})")
        if not ids:
            raise FlexrunError(f"prompt {i!r} is empty: give at least one token")
        return ids

    # ---- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Release memory and remove this run's offload files."""
        if getattr(self, "budget", None) is not None:
            self.budget.close()
            self.budget = None
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None
        if self.trace_path and self.tracer is not None:
            self.tracer.save(self.trace_path)
            self.trace_path = None
        if self.disk is not None:
            self.disk.close()
            self.disk = None
        if self.dist is not None:
            self.dist.close()
            self.dist = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _needs_disk(p: Policy) -> bool:
    return p.weights_disk > 0 or p.cache_disk > 0 or p.act_disk > 0
