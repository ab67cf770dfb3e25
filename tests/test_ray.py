"""Batch jobs on a local Ray of 2 CPUs (skipped without ray[data]): `flexrun generate --ray`
writes what the single-process job writes, resumes, and survives an actor killed by an
injected fault; FlexrunPredictor in a map_batches actor pool gives LLM.generate's tokens."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexrun.cli import main
from flexrun.config import Policy

from conftest import ragged_prompts, same_to_fp32, write_jsonl

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the module: 2 CPUs, a small object store, no dashboard."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, object_store_memory=80 << 20, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    yield
    ctx.enable_progress_bars = bars
    if started:
        ray.shutdown()


def _job(tmp_path: Path) -> Path:
    rows = [{"id": f"t{i}", "prompt": p} for i, p in
            enumerate(["the quick brown fox", "hello", "offloading weights to disk and cpu"])]
    rows += [{"id": i, "input_ids": p} for i, p in enumerate(ragged_prompts(4))]
    rows[1].update(n=2, temperature=0.8, seed=7, max_tokens=5)       # per-row fields
    rows[4].update(logprobs=True, top_logprobs=2)
    rows[5].update(temperature=1.0, top_k=20)                        # seed from --seed
    return write_jsonl(tmp_path / "in.jsonl", rows)


def _cli(model: Path, inp: Path, out: Path, policy: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--device", "cpu", "--input", str(inp),
            "--output", str(out), "--max-new-tokens", "6", "--ignore-eos", "--quiet",
            "--policy", str(policy), "--seed", "3", *extra]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.open()]


@pytest.fixture(scope="module")
def single(llama_dir, tmp_path_factory):
    """The job run in one process: (input, policy file, output lines)."""
    d = tmp_path_factory.mktemp("single")
    inp = _job(d)
    pol = d / "policy.json"
    Policy(gpu_batch_size=2, num_gpu_batches=2).save(pol)
    assert main(_cli(llama_dir, inp, d / "one.jsonl", pol)) == 0
    return inp, pol, _lines(d / "one.jsonl")


RAY = ("--ray", "local", "--workers", "2", "--ray-batch-size", "2")


def test_cli_ray_matches_single_process(llama_dir, single, tmp_path):
    inp, pol, want = single
    assert main(_cli(llama_dir, inp, tmp_path / "ray.jsonl", pol, *RAY)) == 0
    got = _lines(tmp_path / "ray.jsonl")
    assert same_to_fp32(got, want)                 # same lines, same order (the input's)
    assert len(got) == 7 and len(got[1]["samples"]) == 2 and "logprobs" in got[4]


def test_cli_ray_resumes(llama_dir, single, tmp_path):
    """Ids already in the output are skipped (their lines kept as they are)."""
    inp, pol, want = single
    out = tmp_path / "ray.jsonl"
    kept = [dict(want[5], text="kept"), want[0], want[2]]
    write_jsonl(out, kept)
    assert main(_cli(llama_dir, inp, out, pol, *RAY)) == 0
    got = _lines(out)
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert got[5]["text"] == "kept"
    assert same_to_fp32([r for i, r in enumerate(got) if i != 5],
                 [r for i, r in enumerate(want) if i != 5])


def test_actor_killed_mid_job_gives_every_id_once(llama_dir, single, tmp_path, monkeypatch):
    """The first actor to reach its second call exits (os._exit, an injected fault): Ray
    restarts it and retries the batch; every id is in the output once, same tokens."""
    inp, pol, want = single
    marker = tmp_path / "failed"
    monkeypatch.setenv("FLEXRUN_RAY_FAIL_AFTER", f"1:{marker}")
    out = tmp_path / "ray.jsonl"
    assert main(_cli(llama_dir, inp, out, pol, "--ray", "local", "--workers", "2",
                     "--ray-batch-size", "1")) == 0
    assert marker.exists()                  # the fault fired
    assert same_to_fp32(_lines(out), want)


def test_map_batches_actor_pool(llama_dir):
    """The README's way: read rows, map_batches with an actor pool, the same tokens as
    LLM.generate in one process."""
    from flexrun import LLM, SamplingParams
    from flexrun.ray import FlexrunPredictor
    prompts = ["the quick brown fox", "hello world", "a b c d", "offloading weights"]
    pol = Policy(gpu_batch_size=2)
    with LLM(str(llama_dir), device="cpu", policy=pol) as llm:
        ref = llm.generate(prompts, 5, SamplingParams(ignore_eos=True))
    ds = ray.data.from_items([{"id": f"p{i}", "prompt": p} for i, p in enumerate(prompts)])
    out = ds.map_batches(FlexrunPredictor, fn_constructor_kwargs=dict(
        model=str(llama_dir), device="cpu", policy=Policy(gpu_batch_size=2),
        max_new_tokens=5, ignore_eos=True), compute=ray.data.ActorPoolStrategy(size=2),
        batch_size=2, num_cpus=1)
    rows = {r["id"]: r for r in out.take_all()}
    assert [list(rows[f"p{i}"]["output_ids"]) for i in range(4)] == [r.output_ids for r in ref]
    assert [rows[f"p{i}"]["text"] for i in range(4)] == [r.text for r in ref]
    assert {rows[k]["finish_reason"] for k in rows} == {"length"}


def test_cli_ray_errors_are_one_line(llama_dir, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hello"}])
    assert main(["generate", "--model", str(llama_dir), "--input", str(inp), "--output",
                 str(tmp_path / "o.jsonl"), "--workers", "2"]) == 2
    assert main(["generate", "--model", str(llama_dir), "--input", str(inp), "--output",
                 str(tmp_path / "o.jsonl"), "--ray", "--gpus", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "flexrun: error: --workers and --ray-batch-size need --ray"
    assert err[1].startswith("flexrun: error: --ray runs one replica per actor")


def test_worker_error_is_one_line(llama_dir, single, tmp_path, capsys):
    """A FlexrunError in an actor (its budget cannot hold the model) ends the job with one
    line, as it would without Ray."""
    inp, pol, _ = single
    rc = main(_cli(llama_dir, inp, tmp_path / "o.jsonl", pol, "--cpu-mem", "1KiB", *RAY))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("flexrun: error: a Ray worker failed: ") \
        and "\n" not in err, err[-2000:]
