"""The budgets checked while running (engine/budget.py): after each block the measured peaks
(CPU: anonymous RSS + pinned; GPU: reserved + CUDA context) against --cpu-mem / --gpu-mem, one
warning line with the figures when a budget is exceeded, and the run goes on."""
from __future__ import annotations

import re

import torch

from conftest import ragged_prompts
from flexrun import LLM, Policy, SamplingParams
from flexrun.engine.budget import BudgetCheck, pinned_peak, rss_anon

GREEDY = SamplingParams(ignore_eos=True)
SMALL_BLOCKS = Policy(gpu_batch_size=2)      # 5 prompts: 3 blocks


def test_rss_anon_is_measured():
    assert rss_anon() > 10 << 20
    if not torch.cuda.is_available():
        assert pinned_peak() == 0


def _run_with_check(llama_dir, cpu_mem: int) -> tuple[list[str], list, list]:
    """A resident run whose check (not its planner) gets cpu_mem; the lines it said."""
    prompts = ragged_prompts(5)
    with LLM(str(llama_dir), device="cpu", policy=SMALL_BLOCKS) as llm:
        ref = [o.output_ids for o in llm.generate(prompts, 4, GREEDY)]
        said: list[str] = []
        llm.budget = BudgetCheck(torch.device("cpu"), None, cpu_mem, say=said.append)
        got = [o.output_ids for o in llm.generate(prompts, 4, GREEDY)]
        assert llm.budget.blocks == 3
    return said, ref, got


def test_cpu_budget_exceeded_warns_once_with_the_figures(llama_dir):
    said, ref, got = _run_with_check(llama_dir, 1 << 20)
    assert got == ref                                   # the run went on
    assert len(said) == 1, said
    m = re.fullmatch(r"flexrun: warning: CPU memory peak ([\d.]+)(MiB|GiB) \(anonymous RSS "
                     r"[\d.]+(MiB|GiB) \+ pinned [\d.]+MiB\) is over --cpu-mem 1\.0MiB after "
                     r"block 1; the run goes on", said[0])
    assert m, said[0]


def test_cpu_budget_kept_says_nothing(llama_dir):
    said, ref, got = _run_with_check(llama_dir, 1 << 40)
    assert said == [] and got == ref


def test_cpu_mem_given_to_llm_is_checked_on_stderr(llama_dir, capsys):
    """--cpu-mem far above the model's footprint (the plan fits) but below the process's own
    anonymous memory (Python, torch): the check warns once on stderr."""
    with LLM(str(llama_dir), device="cpu", policy=SMALL_BLOCKS, cpu_mem="16MiB") as llm:
        assert llm.budget is not None and llm.budget.sampler is not None
        llm.generate(ragged_prompts(5), 3, GREEDY)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(lines) == 1 and "is over --cpu-mem 16.0MiB after block 1" in lines[0], lines


def test_no_budget_no_check(llama_dir):
    with LLM(str(llama_dir), device="cpu", policy="resident") as llm:
        assert not llm.budget.active and llm.budget.sampler is None
        assert llm.budget.after_block() == []


def test_another_process_on_the_gpu_is_named_at_start(monkeypatch) -> None:
    """More memory held outside the allocator at start than a CUDA context takes: one warning
    line that another process shares the GPU (a run beside a stray one measured 23 GB of
    "context"); a plain context says nothing."""
    from flexrun.engine import budget
    said: list[str] = []
    for held in (560 << 20, 23 << 30):
        monkeypatch.setattr(budget, "cuda_context_bytes", lambda device, held=held: held)
        BudgetCheck(torch.device("cuda"), 16 << 30, None, say=said.append)
    assert len(said) == 1 and "another process is using this GPU" in said[0]
    assert "23.00GiB" in said[0]
