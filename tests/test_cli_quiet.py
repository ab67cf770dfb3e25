"""The LP solver stays quiet: HiGHS's banner ("Running HiGHS ... Copyright ... see
THIRD_PARTY_NOTICES.md") appears nowhere in the output of the commands that search a policy."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEARCH = ["policy", "search", "--model", "dummy:opt-1.3b", "--prompt-len", "64", "--gen-len", "8",
          "--device", "cpu", "--cpu-mem", "4GiB"]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A fresh process: the banner comes with the first solver a process builds."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "flexrun.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_no_banner(res: subprocess.CompletedProcess) -> None:
    for stream in (res.stdout, res.stderr):
        assert "HiGHS" not in stream and "THIRD_PARTY" not in stream, stream


def test_policy_search_prints_no_solver_banner(tmp_path):
    pytest.importorskip("pulp")
    res = run_cli(SEARCH, tmp_path)
    assert res.returncode == 0, res.stderr
    assert_no_banner(res)
    assert res.stdout.startswith("policy: ") and "predicted:" in res.stdout, res.stdout
    lps = re.search(r"search: \d+ block shapes, (\d+) LPs", res.stdout)
    assert lps and int(lps.group(1)) > 0, res.stdout          # the solver did run


def test_generate_policy_auto_prints_no_solver_banner(tmp_path):
    """A --cpu-mem well below the all-resident policy's (about 480MiB) makes the search solve
    LPs; whether a policy then fits or not, no banner appears."""
    pytest.importorskip("pulp")
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "input_ids": [5, 6, 7]}\n')
    out = tmp_path / "out.jsonl"
    res = run_cli(["generate", "--model", "dummy:opt-125m", "--input", str(inp), "--output",
                   str(out), "--policy", "auto", "--device", "cpu", "--cpu-mem", "300MiB",
                   "--offload-dir", str(tmp_path), "--max-new-tokens", "2", "--quiet"], tmp_path)
    assert_no_banner(res)
    if res.returncode == 2:
        assert res.stderr.startswith("flexrun: error: no policy fits"), res.stderr
    else:
        assert res.returncode == 0 and len(out.read_text().splitlines()) == 1, res.stderr


def test_generate_names_its_4bit_settings(tmp_path):
    """A compressed run says which schemes and groups it ran, in the plan line and its last
    line (with the weights' quantization time)."""
    pytest.importorskip("pulp")
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "input_ids": [5, 6, 7]}\n')
    res = run_cli(["generate", "--model", "dummy:opt-125m", "--input", str(inp), "--output",
                   str(tmp_path / "out.jsonl"), "--device", "cpu", "--compress-weight",
                   "--compress-cache", "--max-new-tokens", "2"], tmp_path)
    assert res.returncode == 0, res.stderr
    lines = [x for x in res.stderr.replace("\r", "\n").splitlines() if x.startswith("flexrun")]
    cache = "KV cache kivi, 4-bit groups of 32, window 32, sinks 4"
    assert "weights synth, 4-bit groups of 64" in lines[0] and cache in lines[0], lines
    assert lines[-1].endswith("s") and cache in lines[-1] and "weight quantization" in \
        lines[-1], lines
