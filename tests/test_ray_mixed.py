"""bench.ray_mixed's smoke on the CPU (skipped without ray[data]): the "GPU" pool (the CPU here)
gets the single-process run's calls, one block each, so its rows must equal that run's; the
CPU actors take their share in whole calls; every id comes back once."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.data")

ROOT = Path(__file__).resolve().parents[1]


def test_ray_mixed_smoke(tmp_path) -> None:
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "bench.ray_mixed", "--model", "dummy:opt-125m",
                        "--num-prompts", "44", "--prompt-len", "12", "--gen-len", "4",
                        "--batch-size", "8", "--cpu-batch-size", "4", "--cpu-workers", "1",
                        "--cpu-threads", "1", "--gpu-threads", "1", "--cpu-fraction", "0.3",
                        "-o", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["missing_ids"] == 0 and r["gpu_actor_rows_equal_single"]
    assert r["gpu_rows"] % 8 == 0 and r["gpu_rows"] + r["cpu_rows"] == 44
    assert 0 < r["cpu_rows"] <= 0.3 * 44
    assert r["cpu_actor_token_agreement"] == 1.0        # same device and dtype here
