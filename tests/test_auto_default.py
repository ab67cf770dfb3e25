"""policy="auto" is the default of LLM(...) and `flexrun generate`: its workload, the budgets it
plans for when none are given, the one line it prints; "resident" still gives Policy()."""
from __future__ import annotations

import json
import math

import torch

from conftest import ragged_prompts, write_jsonl
from flexrun import LLM, Policy, SamplingParams
from flexrun.cli.main import main
from flexrun.plan import auto

GREEDY = SamplingParams(ignore_eos=True)


def test_default_workload_fits_the_positions():
    assert auto.default_workload(2048) == (512, 32, None)
    assert auto.default_workload(128) == (96, 32, None)
    assert auto.default_workload(40) == (20, 20, None)


def test_budgets_default_to_this_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(auto, "available_ram", lambda: 10 << 30)
    cpu = torch.device("cpu")
    b = auto.budgets(cpu, None, None, None, None)
    assert b.caps == {"gpu": math.inf, "cpu": 8 << 30, "disk": 0}
    assert b.describe(False) == "cpu 8.00GiB (80% of available), no disk (no --offload-dir)"
    b = auto.budgets(cpu, None, "1GiB", None, str(tmp_path / "not-yet"))
    assert b.caps["cpu"] == 1 << 30 and "cpu" not in b.notes
    assert b.caps["disk"] == auto.free_disk(str(tmp_path)) > 0
    assert auto.budgets(cpu, None, None, "2GiB", str(tmp_path)).caps["disk"] == 2 << 30


def test_available_ram_is_at_most_physical_memory():
    import os
    assert 0 < auto.available_ram() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_llm_defaults_to_auto_and_resident_is_spelled(llama_dir):
    prompts = ragged_prompts(5)
    with LLM(str(llama_dir), device="cpu") as llm:
        assert llm.plan is not None and llm.policy is llm.plan.result.policy
        assert llm.plan.workload == (llm.spec.max_positions - 32, 32, None)
        line = llm.plan.line()
        assert line.startswith(f"policy auto: batch {llm.policy.gpu_batch_size} x ")
        assert "80% of available" in line and "\n" not in line
        got = [o.output_ids for o in llm.generate(prompts, 6, GREEDY)]
    with LLM(str(llama_dir), device="cpu", policy="resident") as llm:
        assert llm.plan is None and llm.policy == Policy()
        assert [o.output_ids for o in llm.generate(prompts, 6, GREEDY)] == got


def test_workload_sets_what_auto_plans_for(opt_dir):
    with LLM(str(opt_dir), device="cpu", workload=(20, 4, 3)) as llm:
        assert llm.plan.workload == (20, 4, 3) and llm.policy.block_size <= 3


def _job(tmp_path):
    return write_jsonl(tmp_path / "in.jsonl",
                       [{"id": i, "input_ids": p} for i, p in enumerate(ragged_prompts(5))])


def test_cli_prints_the_planned_batch(opt_dir, tmp_path, capsys):
    inp = _job(tmp_path)
    args = ["generate", "--model", str(opt_dir), "--device", "cpu", "--input", str(inp),
            "--max-new-tokens", "3", "--ignore-eos"]
    assert main(args + ["--output", str(tmp_path / "a.jsonl")]) == 0
    plan = [ln for ln in capsys.readouterr().err.splitlines() if "policy" in ln]
    assert len(plan) == 1 and plan[0].startswith("flexrun: policy auto: batch "), plan
    assert "planned for 5 prompts of <= 16 + 3 tokens" in plan[0], plan
    assert main(args + ["--output", str(tmp_path / "b.jsonl"), "--policy", "resident"]) == 0
    plan = [ln for ln in capsys.readouterr().err.splitlines() if "policy" in ln]
    assert plan == [f"flexrun: policy {json.dumps(Policy().to_dict())}"], plan
    a, b = ((tmp_path / n).read_text() for n in ("a.jsonl", "b.jsonl"))
    assert a == b


def test_cli_batch_flags_need_a_policy(opt_dir, tmp_path, capsys):
    inp = _job(tmp_path)
    rc = main(["generate", "--model", str(opt_dir), "--device", "cpu", "--input", str(inp),
               "--output", str(tmp_path / "o.jsonl"), "--gpu-batch-size", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("flexrun: error: --gpu-batch-size") and "\n" not in err
    assert "--policy resident" in err
