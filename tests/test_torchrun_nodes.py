"""The pipeline across nodes: two torchrun agents, each a "node" of one process, meeting at a
c10d rendezvous on localhost (as two hosts would at one host's address), on the CPU with
gloo: the same JSONL as one process (docs/scaling.md)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from flexrun.cli import main
from flexrun.config import Policy

from conftest import ragged_prompts, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(model: Path, inp: Path, out: Path, pol: Path) -> list[str]:
    return ["generate", "--model", str(model), "--device", "cpu", "--input", str(inp),
            "--output", str(out), "--max-new-tokens", "6", "--ignore-eos", "--quiet",
            "--policy", str(pol)]


def test_two_nodes_c10d_rendezvous(opt_dir, tmp_path):
    rows = [{"id": i, "input_ids": p} for i, p in enumerate(ragged_prompts(4))]
    rows.append({"id": "t", "prompt": "the quick brown fox"})
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    pol = tmp_path / "policy.json"
    Policy(gpu_batch_size=2, num_gpu_batches=2).save(pol)
    assert main(_cli(opt_dir, inp, tmp_path / "one.jsonl", pol)) == 0
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    port = _free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
         "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
         "flexrun-test", "-m", "flexrun.cli", *_cli(opt_dir, inp, tmp_path / "two.jsonl", pol)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(x[-2000:] for x in logs)
    one = [json.loads(x) for x in (tmp_path / "one.jsonl").open()]
    two = [json.loads(x) for x in (tmp_path / "two.jsonl").open()]
    assert two == one and len(one) == 5
