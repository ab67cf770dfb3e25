"""Pipeline parallelism: 2 gloo processes on the CPU give the single-process run's tokens."""
import itertools
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flexrun
from conftest import ragged_prompts, write_jsonl
from flexrun import LLM, Policy, SamplingParams
from flexrun.cli import main
from flexrun.config import FlexrunError
from flexrun.plan.stages import bubble_fraction, plan_stages, split_groups, split_units
from flexrun.plan.hardware import default_profile
from flexrun.models.dummy import dummy_spec
from flexrun.parallel.launch import check_devices
from flexrun.plan.stage_search import pipeline_times, search_stages

NEW = 8
GREEDY = SamplingParams(ignore_eos=True)
ROOT = Path(flexrun.__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def short_dist_timeout():
    """A hang in a test becomes an error in a minute, not half an hour."""
    old = os.environ.get("FLEXRUN_DIST_TIMEOUT")
    os.environ["FLEXRUN_DIST_TIMEOUT"] = "60"
    yield
    if old is None:
        os.environ.pop("FLEXRUN_DIST_TIMEOUT")
    else:
        os.environ["FLEXRUN_DIST_TIMEOUT"] = old


def _ids(outs) -> list[list[int]]:
    return [o.output_ids for o in outs]


def _single(d: Path, policy: Policy, prompts, sampling=GREEDY, tmp=None):
    with LLM(str(d), device="cpu", policy=policy, offload_dir=tmp) as llm:
        return llm.generate(prompts, NEW, sampling)


# ---- the split ------------------------------------------------------------------------------
def test_split_is_contiguous_and_optimal():
    rng = random.Random(0)
    for _ in range(40):
        costs = [rng.randint(1, 100) for _ in range(rng.randint(2, 9))]
        for k in range(1, len(costs) + 1):
            ranges = split_units(costs, k)
            assert [u for r in ranges for u in r] == list(range(len(costs)))
            assert all(len(r) > 0 for r in ranges)
            worst = max(sum(costs[u] for u in r) for r in ranges)
            best = min(max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, len(costs))))
                       for cuts in itertools.combinations(range(1, len(costs)), k - 1))
            assert worst == best
    assert split_units([5, 10, 10, 10, 5], 2) == [range(0, 2), range(2, 5)]
    with pytest.raises(FlexrunError, match="exceeds the model's 3 units"):
        split_units([1, 2, 3], 4)
    assert bubble_fraction(2, 3) == pytest.approx(1 / 4)
    assert split_groups(5, 2) == [range(0, 2), range(2, 5)]
    assert split_groups(1, 4) == [range(0, 1)]


def test_stage_plan_shares_the_host_budget(tmp_path, capsys):
    """The cost model plans every stage with its share of --cpu-mem; one block shape."""
    spec = dummy_spec("opt-125m")
    prof = default_profile("cpu")
    one = search_stages(spec, prof, [range(spec.num_units)], 64, 8, device="cpu")
    assert one.throughput > 0 and one.policies[0].weights_gpu == 100
    stages = plan_stages(spec, torch.float32, 2)
    assert stages == [range(0, 7), range(7, 14)]
    # too little for all resident: part of the KV cache on disk (each stage's process also
    # holds the profile's baseline, 154 MB)
    budget = 1000 << 20
    plan = search_stages(spec, prof, stages, 64, 8, cpu_mem=budget, device="cpu")
    assert len({(p.gpu_batch_size, p.num_gpu_batches) for p in plan.policies}) == 1
    assert all(pk["cpu"] <= budget / 2 for pk in plan.peaks)
    assert all(p.cache_disk > 0 for p in plan.policies)
    assert plan.policies[0] != plan.policies[1]                 # each stage its own placement
    with pytest.raises(FlexrunError, match="pipeline stage 0 of 2"):
        search_stages(spec, prof, stages, 64, 8, cpu_mem=300 << 20, device="cpu")
    # fewer groups than stages: a step is one group's round trip through all of them
    assert pipeline_times([2, 2], [1, 3], 1) == (4, 4)
    assert pipeline_times([2, 2], [1, 3], 2) == (3, 3)
    assert main(["policy", "search", "--model", "dummy:opt-125m", "--prompt-len", "64",
                 "--gen-len", "8", "--gpus", "2", "--device", "cpu", "--cpu-mem", "1000MiB",
                 "-o", str(tmp_path / "plan")]) == 0
    assert "pipeline of 2 stages" in capsys.readouterr().out
    assert [Policy.load(tmp_path / f"plan.stage{i}.json") for i in (0, 1)] == plan.policies


# ---- same tokens as one process -------------------------------------------------------------
@pytest.mark.parametrize("lazy", [False, True], ids=["posted-ahead", "posted-when-needed"])
def test_llama_resident_greedy_sampled_stops_and_logits(llama_dir, monkeypatch, lazy):
    """2x3 micro-batches, ragged prompts (a second block of one batch); greedy, seeded
    sampling, stop ids that end a whole micro-batch early, and prompt logits. Receives posted
    ahead (gloo) or only when needed, in order (NCCL's way: StageComm.lazy)."""
    if lazy:
        monkeypatch.setenv("FLEXRUN_DIST_LAZY", "1")
    pol = Policy(gpu_batch_size=2, num_gpu_batches=3)
    prompts = ragged_prompts(7)
    ref = _single(llama_dir, pol, prompts)
    order = sorted(range(7), key=lambda i: -len(prompts[i]))
    stops = SamplingParams(stop_token_ids=[ref[order[0]].output_ids[1],
                                           ref[order[1]].output_ids[1]])
    sampled = SamplingParams(temperature=0.9, top_k=40, seed=7, ignore_eos=True)
    ref_stop = _single(llama_dir, pol, prompts, stops)
    ref_sampled = _single(llama_dir, pol, prompts, sampled)
    assert all(ref_stop[i].finish_reason == "stop" for i in order[:2])
    with LLM(str(llama_dir), device="cpu", policy=pol) as one:
        ref_logits = one.prompt_logits(prompts[:3])
    with LLM(str(llama_dir), device="cpu", policy=pol, num_gpus=2) as llm:
        assert llm.stages == [range(0, 3), range(3, 5)]
        assert _ids(llm.generate(prompts, NEW, GREEDY)) == _ids(ref)
        got = llm.generate(prompts, NEW, stops)
        assert _ids(got) == _ids(ref_stop)
        assert [o.finish_reason for o in got] == [o.finish_reason for o in ref_stop]
        assert _ids(llm.generate(prompts, NEW, sampled)) == _ids(ref_sampled)
        for a, b in zip(llm.prompt_logits(prompts[:3]), ref_logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert llm.stats.generated_tokens > 0 and llm.stats.decode_s > 0


def test_opt_offloaded_own_policy_per_stage(opt_dir, tmp_path):
    """Each stage its own placement: weights, KV cache and activations on CPU and disk
    (OPT ties the head to the embedding: both stages hold that tensor)."""
    pol = Policy(gpu_batch_size=2, num_gpu_batches=3, weights_gpu=0, weights_cpu=40,
                 weights_disk=60, cache_gpu=0, cache_cpu=50, cache_disk=50, act_gpu=0,
                 act_cpu=50, act_disk=50, cpu_attention=True)
    other = Policy(gpu_batch_size=2, num_gpu_batches=3, weights_gpu=50, weights_cpu=0,
                   weights_disk=50, cache_gpu=0, cache_cpu=0, cache_disk=100, act_gpu=0,
                   act_cpu=0, act_disk=100)
    prompts = ragged_prompts(8)
    ref = _single(opt_dir, pol, prompts, tmp=str(tmp_path))
    with LLM(str(opt_dir), device="cpu", policy=[pol, other], offload_dir=str(tmp_path),
             num_gpus=2) as llm:
        assert llm.stage_policies[1].cache_disk == 100
        assert llm.stats.weights_split["disk"] > 0 and llm.stats.weights_split["cpu"] > 0
        assert len(list(tmp_path.iterdir())) == 2          # one offload dir per stage
        assert _ids(llm.generate(prompts, NEW, GREEDY)) == _ids(ref)
    assert list(tmp_path.iterdir()) == []


def test_auto_policy_per_stage(opt_dir):
    """--policy auto with two stages: the cost model's plan, then the same tokens."""
    prompts = ragged_prompts(5)
    with LLM(str(opt_dir), device="cpu", policy="auto", num_gpus=2) as llm:
        pols = llm.stage_policies
        assert len(pols) == 2 and pols[0].block_size == pols[1].block_size
        got = _ids(llm.generate(prompts, NEW, GREEDY))
    shape = Policy(gpu_batch_size=pols[0].gpu_batch_size, num_gpu_batches=pols[0].num_gpu_batches)
    assert got == _ids(_single(opt_dir, shape, prompts))


def test_dead_stage_is_an_error_not_a_hang(llama_dir, tmp_path):
    pol = Policy(gpu_batch_size=1, weights_gpu=0, weights_disk=100)
    llm = LLM(str(llama_dir), device="cpu", policy=pol, offload_dir=str(tmp_path), num_gpus=2)
    with llm:
        os.kill(llm.pipeline.procs[1].pid, signal.SIGKILL)
        with pytest.raises(FlexrunError, match="pipeline stage 1 exited unexpectedly"):
            llm.generate(ragged_prompts(2), NEW, GREEDY)
    assert list(tmp_path.iterdir()) == []


# ---- errors ---------------------------------------------------------------------------------
def test_errors_before_any_process_starts(opt_dir, monkeypatch):
    with pytest.raises(FlexrunError, match="--gpus 6 exceeds the model's 5 units"):
        LLM(str(opt_dir), device="cpu", num_gpus=6)
    with pytest.raises(FlexrunError, match="3 policies for --gpus 2"):
        LLM(str(opt_dir), device="cpu", policy=[Policy()] * 3, num_gpus=2)
    with pytest.raises(FlexrunError, match="must share gpu_batch_size"):
        LLM(str(opt_dir), device="cpu", policy=[Policy(), Policy(num_gpu_batches=2)],
            num_gpus=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(FlexrunError, match="--gpus 2 exceeds the 1 visible CUDA device"):
        LLM(str(opt_dir), device="cuda", num_gpus=2)
    monkeypatch.setenv("FLEXRUN_DIST_BACKEND", "gloo")      # stages may share a GPU
    check_devices(2, torch.device("cuda"))
    monkeypatch.setenv("FLEXRUN_DIST_BACKEND", "mpi")
    with pytest.raises(FlexrunError, match="must be nccl or gloo"):
        check_devices(2, torch.device("cuda"))


def test_cli_error_is_one_line(opt_dir, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 0, "input_ids": [5, 6]}])
    rc = main(["generate", "--model", str(opt_dir), "--device", "cpu", "--gpus", "9",
               "--input", str(inp), "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("flexrun: error: --gpus 9 exceeds") and "\n" not in err


# ---- the CLI, spawned and under torchrun ----------------------------------------------------
def _job(tmp_path: Path) -> Path:
    rows = [{"id": f"t{i}", "prompt": p} for i, p in
            enumerate(["the quick brown fox", "hello", "offloading weights to disk and cpu"])]
    rows += [{"id": i, "input_ids": p} for i, p in enumerate(ragged_prompts(4))]
    return write_jsonl(tmp_path / "in.jsonl", rows)


def _out(path: Path) -> dict:
    return {json.dumps(r["id"]): r["output_ids"] for r in map(json.loads, path.open())}


def _cli(model: Path, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--device", "cpu", "--input", str(inp),
            "--output", str(out), "--max-new-tokens", "6", "--ignore-eos", "--quiet",
            "--policy", "resident", "--gpu-batch-size", "2", "--num-gpu-batches", "2", *extra]


def test_cli_gpus_2_matches_gpus_1(llama_dir, tmp_path):
    """--gpus 2 with a policy file per stage (the second offloads to disk)."""
    inp = _job(tmp_path)
    Policy().save(tmp_path / "p0.json")
    Policy(cache_gpu=0, cache_disk=100, act_gpu=50, act_disk=50).save(tmp_path / "p1.json")
    assert main(_cli(llama_dir, inp, tmp_path / "one.jsonl", "--gpus", "1")) == 0
    assert main(_cli(llama_dir, inp, tmp_path / "two.jsonl", "--gpus", "2", "--policy",
                     f"{tmp_path / 'p0.json'},{tmp_path / 'p1.json'}", "--offload-dir",
                     str(tmp_path))) == 0
    one, two = _out(tmp_path / "one.jsonl"), _out(tmp_path / "two.jsonl")
    assert len(one) == 7 and two == one


def test_torchrun_launch(opt_dir, tmp_path):
    """The same CLI under torchrun: each rank runs its stage, rank 0 writes the output."""
    inp = _job(tmp_path)
    assert main(_cli(opt_dir, inp, tmp_path / "one.jsonl")) == 0
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", "2", "-m", "flexrun.cli",
           *_cli(opt_dir, inp, tmp_path / "two.jsonl")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _out(tmp_path / "two.jsonl") == _out(tmp_path / "one.jsonl")
