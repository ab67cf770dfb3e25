"""How a Ray actor plans when several share a host (flexrun/ray/share.py): host-wide rates
and budgets divided among the host's actors, so k actors on one host never plan more PCIe or
DRAM than it has. No Ray needed."""
from __future__ import annotations

import os
import sys

import pytest

from flexrun.cli import main
from flexrun.config import Policy
from flexrun.models.loader import open_checkpoint
from flexrun.plan.hardware import HardwareProfile, PROFILES_DIR, default_profile
from flexrun.plan.search import search
from flexrun.ray import FlexrunPredictor, HostShare, actors_per_host, shared_budgets
from flexrun.ray.share import shared_profile

H100 = PROFILES_DIR / "h100.json"


def test_actors_per_host_from_resources():
    assert actors_per_host({"CPU": 64, "GPU": 8}, {"CPU": 1, "GPU": 1}) == 8
    assert actors_per_host({"CPU": 64, "GPU": 8}, {"CPU": 1, "GPU": 1}, pool=4) == 4
    assert actors_per_host({"CPU": 4, "GPU": 8}, {"CPU": 2, "GPU": 1}) == 2   # CPUs bind
    assert actors_per_host({"CPU": 2}, {"CPU": 1, "GPU": 0}) == 2
    assert actors_per_host({"CPU": 16, "GPU": 2}, {"CPU": 1, "GPU": 0.5}) == 4
    assert actors_per_host({"CPU": 1}, {"CPU": 2}) == 1                      # never 0


def test_shared_profile_divides_host_rates_and_capacities():
    prof = HardwareProfile.load(H100)
    half = shared_profile(prof, HostShare(2))
    for name in ("h2d_pinned", "d2h_pinned", "disk_read", "cpu_mem_bw", "cpu_flops_decode"):
        assert getattr(half, name) == pytest.approx(getattr(prof, name) / 2)
    assert half.cpu_mem == prof.cpu_mem // 2 and half.disk_mem == prof.disk_mem // 2
    assert half.gpu_mem == prof.gpu_mem and half.gpu_flops_decode == prof.gpu_flops_decode
    split = shared_profile(prof, HostShare(1, gpu_fraction=0.5))
    assert split.gpu_mem == prof.gpu_mem // 2 and split.h2d_pinned == prof.h2d_pinned
    assert shared_profile(prof, HostShare(1)) == prof
    assert shared_budgets("16GiB", "100GiB", None, HostShare(4)) == (16 << 30, 25 << 30, None)
    assert shared_budgets("16GiB", None, "8GiB", HostShare(1, 0.5)) == (8 << 30, None, 8 << 30)
    # several actors and no --cpu-mem: 80% of the host's memory, divided
    assert shared_budgets(None, None, None, HostShare(2), ram=10 << 30) == (None, 4 << 30, None)


def test_two_actors_on_one_host_do_not_each_get_the_whole_link():
    """OPT-30B under 16 GiB of GPU memory streams its weights over PCIe: one actor alone on
    a host is predicted its full rate, each of two actors sharing the host about half, so the
    host's total stays that of one actor (a model resident on the GPU would scale instead)."""
    prof = HardwareProfile.load(H100)
    spec = open_checkpoint("dummy:opt-30b").spec

    def tok_s(k: int) -> float:
        gpu, cpu, disk = shared_budgets("16GiB", "200GiB", None, HostShare(k))
        return search(spec, shared_profile(prof, HostShare(k)), 512, 32, gpu, cpu, disk,
                      "cuda", 2).prediction.throughput
    one, two = tok_s(1), tok_s(2)
    assert two < 0.6 * one
    assert 2 * two <= 1.05 * one


def test_actor_plans_with_its_share(llama_dir, tmp_path, monkeypatch):
    """The actor's policy="auto" is the LLM's own plan with the shared profile (through
    $FLEXRUN_PROFILE) and half the host's --cpu-mem; the variable is restored afterwards."""
    from flexrun import LLM
    monkeypatch.delenv("FLEXRUN_PROFILE", raising=False)
    cpu = 512 << 20         # each actor: its half less its process baseline (154 MB)
    pred = FlexrunPredictor(model=str(llama_dir), device="cpu", cpu_mem=cpu, actors_per_host=2,
                            workload=(16, 8, 8), max_new_tokens=8)
    try:
        assert "FLEXRUN_PROFILE" not in os.environ
        assert pred.share == HostShare(2) and pred.llm.cpu_mem == cpu // 2
        shared_profile(default_profile("cpu"), HostShare(2)).save(tmp_path / "half.json")
        monkeypatch.setenv("FLEXRUN_PROFILE", str(tmp_path / "half.json"))
        with LLM(str(llama_dir), device="cpu", policy="auto", cpu_mem=cpu // 2,
                 workload=(16, 8, 8)) as llm:
            assert pred.llm.policy.to_dict() == llm.policy.to_dict()
    finally:
        pred.close()


def test_predictor_without_ray_matches_llm(llama_dir):
    """The callable class on a plain dict batch (no Ray): per-row fields as a JSONL line sets
    them, outputs as LLM.generate gives them."""
    import numpy as np
    from flexrun import LLM, SamplingParams
    pol = Policy(gpu_batch_size=2)
    prompts = [[5, 9, 40, 7], [11, 3]]
    batch = {"id": np.array(["a", "b"]), "input_ids": np.array(prompts, dtype=object),
             "max_tokens": np.array([4, 6])}
    with LLM(str(llama_dir), device="cpu", policy=Policy(gpu_batch_size=2)) as llm:
        ref = llm.generate(prompts, 6, [SamplingParams(max_tokens=4, ignore_eos=True),
                                        SamplingParams(max_tokens=6, ignore_eos=True)])
    pred = FlexrunPredictor(model=str(llama_dir), device="cpu", policy=pol, ignore_eos=True)
    try:
        out = pred(batch)
    finally:
        pred.close()
    assert [list(x) for x in out["output_ids"]] == [r.output_ids for r in ref]
    assert list(out["finish_reason"]) == ["length", "length"]
    assert list(out["id"]) == ["a", "b"]


def test_cli_ray_without_ray_is_one_line(llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "hello"}\n')
    assert main(["generate", "--model", str(llama_dir), "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(tmp_path / "out.jsonl"), "--ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flexrun: error: --ray needs Ray: pip install") and "\n" not in err
