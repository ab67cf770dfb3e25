"""Batch jobs run in-process: bad input is one line and exit 2, a resumed job cuts a torn line
and skips finished ids, outputs end in input order, stale offload dirs are removed. Kills,
signals and mounts run as subprocesses in test_jobs_signals.py.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from flexrun.cli import main
from flexrun.jobs import OutputWriter
from job_files import PRIOR, Job, one_error_line


@pytest.fixture
def job(tmp_path, opt_dir) -> Job:
    return Job(tmp_path, opt_dir)


def model_copy(job: Job, edit) -> None:
    """Point the job at a copy of its model, changed by edit(dir)."""
    d = job.root / "model"
    shutil.copytree(job.model, d)
    edit(d)
    job.model = d


def _edit_config(**changes):
    def edit(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **changes}))
    return edit


def _truncate_shard(d: Path):
    f = d / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)


def _shard_then_lose_one(d: Path):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(d / "model.safetensors"))
    keys = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": keys[:len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in halves.items():
        save_file({k: sd[k] for k in ks}, str(d / name), metadata={"format": "pt"})
    (d / "model.safetensors").unlink()
    wm = {k: name for name, ks in halves.items() for k in ks}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    (d / "model-00002-of-00002.safetensors").unlink()


def _inp(raw: bytes):
    return lambda job: job.inp.write_bytes(raw)


def _rows(*rows):
    return lambda job: write_jsonl(job.inp, list(rows))


# case -> (setup(job), extra CLI args, words the one error line must contain)
CASES = {
    "duplicate-id": (_rows({"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}), [],
                     ["line 2", "duplicate id 1", "unique"]),
    "empty-prompt": (_rows({"id": 7, "prompt": ""}), [], ["id 7", "empty", "remove the line"]),
    "empty-input-ids": (_rows({"id": 7, "input_ids": []}), [], ["id 7", "empty"]),
    "non-utf8": (_inp(b'{"id": 1, "prompt": "caf\xe9"}\n'), [], ["line 1", "UTF-8", "re-encode"]),
    "malformed-jsonl": (_inp(b'{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": \n'), [],
                        ["line 2", "malformed JSON", '"id"']),
    "empty-input": (_inp(b""), [], ["holds no prompts"]),
    "prompt-too-long": (_rows({"id": "long", "input_ids": [5] * 200}), [],
                        ["'long'", "200 tokens", "128 positions", "--truncate left"]),
    "token-out-of-vocab": (_rows({"id": "v", "input_ids": [5, 99999]}), [],
                           ["'v'", "99999", "vocabulary"]),
    "max-new-tokens-0": (None, ["--max-new-tokens", "0"], ["--max-new-tokens must be >= 1"]),
    "max-new-tokens-neg": (None, ["--max-new-tokens", "-5"], ["--max-new-tokens", "-5"]),
    "missing-model-dir": (lambda job: setattr(job, "model", job.root / "nope"), [],
                          ["not found", "HF checkpoint directory"]),
    "missing-shard": (lambda job: model_copy(job, _shard_then_lose_one), [],
                      ["model-00002-of-00002.safetensors", "missing", "complete checkpoint"]),
    "unsupported-arch": (lambda job: model_copy(job, _edit_config(
        model_type="gpt2", architectures=["GPT2LMHeadModel"])), [],
        ["unsupported architecture 'GPT2LMHeadModel'", "flexrun runs", "llama", "opt"]),
    "truncated-shard": (lambda job: model_copy(job, _truncate_shard), [],
                        ["model.safetensors", "corrupt or truncated"]),
    "shape-mismatch": (lambda job: model_copy(job, _edit_config(ffn_dim=256)), [],
                       ["(128,)", "(256,)", "do not match"]),
    "budget-too-small": (lambda job: (setattr(job, "model", "dummy:opt-125m"),
                                      _rows({"id": 1, "input_ids": [5, 6]})(job)),
                         ["--cpu-mem", "1MiB"], ["--cpu-mem is 1.0MiB", "raise --cpu-mem"]),
    "offload-dir-missing": (lambda job: job.off.rmdir(), [], ["does not exist", "--offload-dir"]),
    "offload-dir-is-file": (lambda job: (job.off.rmdir(), job.off.write_text("")), [],
                            ["not a directory", "--offload-dir"]),
    "output-is-dir": (lambda job: setattr(job, "out", job.off), [], ["is a directory", "--output"]),
    "output-dir-missing": (lambda job: setattr(job, "out", job.root / "no" / "out.jsonl"), [],
                           ["does not exist", "--output"]),
    # per-row sampling fields and chat lines: checked like the rest, before the model loads
    "row-field-type": (_rows({"id": 3, "prompt": "a", "n": "two"}), [],
                       ["line 1", "id 3", '"n" must be an integer']),
    "row-field-value": (_rows({"id": 3, "prompt": "a", "temperature": -1}), [],
                        ["line 1", "id 3", "temperature must be >= 0"]),
    "top-logprobs-alone": (_rows({"id": 3, "prompt": "a", "top_logprobs": 2}), [],
                           ["id 3", "top_logprobs needs logprobs"]),
    "five-stops": (_rows({"id": 3, "prompt": "a", "stop": list("abcde")}), [],
                   ["id 3", "stop must be up to 4"]),
    "message-without-content": (_rows({"id": 4, "messages": [{"role": "user"}]}), [],
                                ["line 1", "id 4", "no \"content\""]),
    "chat-without-template": (_rows({"id": 4, "messages": [{"role": "user", "content": "hi"}]}),
                              [], ["no chat template", "--chat-template FILE"]),
    "chat-template-missing": (None, ["--chat-template", "/nonexistent/t.jinja"],
                              ["/nonexistent/t.jinja", "not found", "--chat-template"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(job, capsys, case):
    setup, extra, words = CASES[case]
    before = job.out.read_bytes()
    if setup is not None:
        setup(job)
    rc = main(job.args(*extra))
    one_error_line(rc, capsys.readouterr().err, *words)
    assert (job.root / "out.jsonl").read_bytes() == before      # finished output kept
    assert job.offload_files() == []                           # run's subdirectory removed


def test_truncate_left_keeps_the_end(job, capsys):
    long = [5 + i % 300 for i in range(200)]
    write_jsonl(job.inp, [{"id": "long", "input_ids": long},
                          {"id": "cut", "input_ids": long[-(128 - 8):]}])
    assert main(job.args("--truncate", "left", new=8)) == 0
    rows = {r["id"]: r for r in map(json.loads, job.out.read_text().splitlines())}
    assert len(rows["long"]["output_ids"]) == 8
    assert rows["long"]["output_ids"] == rows["cut"]["output_ids"]
    assert job.offload_files() == []


def test_resume_cuts_torn_line_and_skips_done(job, capsys):
    job.out.unlink()
    assert main(job.args()) == 0
    ref = job.out.read_text().splitlines(keepends=True)
    assert len(ref) == 5
    torn = "".join(ref[:2]) + ref[2][:25]                       # a kill in the middle of a line
    job.out.write_text(torn)
    assert main(job.args()) == 0
    lines = job.out.read_text().splitlines(keepends=True)
    assert lines[:2] == ref[:2]                                 # finished lines untouched
    assert sorted(lines) == sorted(ref)                         # the rest regenerated, same result
    assert job.ids() == [json.loads(r)["id"] for r in ref] == ["old", "p0", "p1", "p2", "p3"]
    capsys.readouterr()
    assert main(job.args()) == 0                                # all done: nothing to do
    assert job.out.read_text().splitlines(keepends=True) == lines


TEMPLATE = Path(__file__).parent / "data" / "chatml.jinja"


def test_chat_lines_and_row_fields(job, capsys):
    """Plain lines with "messages" (rendered by --chat-template) and per-row fields: n gives
    "samples", logprobs gives "logprobs", max_tokens overrides --max-new-tokens; the same ids
    as the Python API gives for the rendered prompt."""
    from flexrun import LLM, SamplingParams
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    c1 = {"id": "c1", "messages": chat, "n": 2, "temperature": 0.9, "seed": 5, "logprobs": True,
          "top_logprobs": 2, "max_tokens": 6}
    write_jsonl(job.inp, [c1, {"id": "c2", "messages": chat[1:], "max_tokens": 3},
                          {"id": "p", "prompt": "hello world"},
                          {"id": "s", "prompt": "hello world", "prompt_logprobs": 2}])
    job.out.unlink()
    assert main(job.args("--chat-template", str(TEMPLATE))) == 0
    rows = {r["id"]: r for r in map(json.loads, job.out.read_text().splitlines())}
    assert list(rows["p"]) == ["id", "output_ids", "text", "finish_reason"]
    assert len(rows["p"]["output_ids"]) == 4 and set(rows["c2"]) == set(rows["p"])
    r1 = rows["c1"]
    assert [len(s["output_ids"]) for s in r1["samples"]] == [6, 6]
    assert r1["output_ids"] == r1["samples"][0]["output_ids"]
    assert r1["logprobs"] == r1["samples"][0]["logprobs"]
    assert [e["token_id"] for e in r1["logprobs"]] == r1["output_ids"]
    assert all(len(e["top_logprobs"]) == 2 for e in r1["logprobs"])
    with LLM(str(job.model), device="cpu", policy="resident") as llm:
        ids = [llm.chat_prompt_ids(m, chat_template=TEMPLATE.read_text())
               for m in (chat, chat[1:])]
        want = llm.generate(ids, max_new_tokens=6, sampling=[
            SamplingParams(temperature=0.9, seed=5, n=2, logprobs=True, top_logprobs=2,
                           max_tokens=6, ignore_eos=True),
            SamplingParams(max_tokens=3, ignore_eos=True)])
    assert [s["output_ids"] for s in r1["samples"]] == [s.output_ids for s in want[0].samples]
    assert rows["c2"]["output_ids"] == want[1].output_ids
    assert [e["logprob"] for e in r1["logprobs"]] == pytest.approx(
        [t.logprob for t in want[0].samples[0].logprobs], abs=1e-5)
    scored = rows["s"]["prompt_logprobs"]           # scoring: each prompt token's logprob
    with LLM(str(job.model), device="cpu", policy="resident") as llm:
        ids = llm.tokenizer.encode("hello world").ids
        lp = torch.log_softmax(llm.prompt_logits([ids])[0].double(), -1)
    assert scored[0] is None and [e["token_id"] for e in scored[1:]] == ids[1:]
    assert [e["logprob"] for e in scored[1:]] == pytest.approx(
        [float(lp[m - 1, ids[m]]) for m in range(1, len(ids))], abs=1e-4)
    assert all(len(e["top_logprobs"]) == 2 for e in scored[1:])


def test_seed_per_id_survives_resume(job, capsys):
    """--seed gives each row its own seed from (seed, id): a resumed job draws the same."""
    job.out.unlink()
    args = job.args("--temperature", "1.0", "--seed", "3", new=6)
    assert main(args) == 0
    ref = job.out.read_text().splitlines(keepends=True)
    outs = [json.loads(r)["output_ids"] for r in ref]
    assert len(set(map(tuple, outs[1:]))) == len(outs) - 1      # rows do not share a stream
    job.out.write_text(ref[0] + ref[3])
    assert main(args) == 0
    assert job.out.read_text().splitlines(keepends=True) == ref


def _ragged(job: Job, n: int = 6) -> list:
    """Input: "old" (already in the output), then p0..p{n-1} with growing prompts, so the
    blocks (1 prompt each, longest first) finish in reverse input order."""
    rows = [{"id": "old", "input_ids": [5]}]
    rows += [{"id": f"p{i}", "input_ids": list(range(5, 7 + 2 * i))} for i in range(n)]
    write_jsonl(job.inp, rows)
    return [r["id"] for r in rows]


def _appended(monkeypatch, stop_after=None) -> list:
    """Record the ids in the order they are appended; SIGINT the job once `stop_after` is."""
    seen, orig = [], OutputWriter.write

    def write(self, row):
        orig(self, row)
        seen.append(row["id"])
        if row["id"] == stop_after:
            os.kill(os.getpid(), signal.SIGINT)     # the job stops after this block
    monkeypatch.setattr(OutputWriter, "write", write)
    return seen


def test_output_ends_in_input_order(job, capsys, monkeypatch):
    """Lines are appended as blocks finish, then put in the input's order; an id that is not
    in the input keeps its place after them; the file keeps its mode."""
    ids = _ragged(job)
    write_jsonl(job.out, [{**PRIOR, "id": "gone"}, PRIOR])
    before = job.out.read_text().splitlines(keepends=True)
    job.out.chmod(0o640)
    appended = _appended(monkeypatch)
    assert main(job.args()) == 0
    assert appended == [f"p{i}" for i in reversed(range(6))]    # longest first
    assert job.ids() == ids + ["gone"]
    lines = job.out.read_text().splitlines(keepends=True)
    assert lines[0] == before[1] and lines[-1] == before[0]     # the same bytes, moved
    assert oct(job.out.stat().st_mode & 0o777) == "0o640"
    assert [f.name for f in job.root.iterdir() if f.name.startswith(".")] == []  # no temp file
    assert job.offload_files() == []


def test_stopped_job_keeps_its_order_and_the_resumed_one_ends_in_input_order(job, capsys,
                                                                              monkeypatch):
    ids = _ragged(job)
    appended = _appended(monkeypatch, stop_after="p4")
    assert main(job.args()) == 128 + signal.SIGINT
    assert appended == ["p5", "p4"]
    assert job.ids() == ["old", "p5", "p4"]             # as appended: resume reads it as is
    monkeypatch.undo()
    assert main(job.args()) == 0
    assert job.ids() == ids
    ref = job.out.read_bytes()
    # a run that stopped after its last line but before the rewrite: the rerun orders it
    job.out.write_bytes(b"".join(reversed(ref.splitlines(keepends=True))))
    assert main(job.args()) == 0                        # nothing to generate
    assert job.out.read_bytes() == ref


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_offload_dirs_are_removed(job, capsys):
    """Dead pid: removed. Live pid, a dead-looking pid whose .lock is held (a run in another
    PID namespace sharing the directory) and names flexrun did not make: kept."""
    dead = job.off / f"flexrun-run-{_dead_pid()}-0badc0de"
    alive = job.off / f"flexrun-run-{os.getpid()}-12345678"
    locked = job.off / f"flexrun-run-{_dead_pid()}-10cced00"
    other = job.off / "flexrun-run-notes"
    for d in (dead, alive, locked, other):
        d.mkdir()
        (d / "000001-x.bin").write_bytes(b"0" * 10)
    with open(locked / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert main(job.args()) == 0
    assert job.offload_files() == sorted([alive.name, locked.name, other.name])
