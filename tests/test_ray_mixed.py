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


def test_split_gives_the_gpu_whole_calls_and_the_cpu_its_share() -> None:
    from bench.ray_mixed import split_rows
    rows = list(range(1000))
    gpu, cpu = split_rows(rows, 0.1, 128)          # 100 rows of share: 7 GPU calls
    assert (len(gpu), len(cpu)) == (896, 104) and gpu + cpu == rows
    assert split_rows(rows, 0.01, 128) == (rows, [])      # nearest: 8 calls, all rows
    assert split_rows(rows, 1.0, 128) == ([], rows)
    # 16,384 prompts, a 0.26% share (42 rows): rounding up to a whole GPU call would give the
    # CPU actors 128 rows, three times their share; the nearest split gives them none
    assert split_rows(list(range(16384)), 0.0026, 128) == (list(range(16384)), [])


def test_blocks_make_calls_of_exactly_their_rows() -> None:
    """from_items(override_num_blocks=n) splits rows evenly (44 rows in 6 blocks: calls of 8,
    8, 8, 6, 8, 6); the single-process run's batches are 8 x 5 and 4."""
    import ray
    from bench.ray_mixed import blocks
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             configure_logging=False, object_store_memory=80 << 20)
    try:
        rows = [{"id": str(i), "input_ids": [i, i + 1]} for i in range(44)]
        ds = blocks(rows, 8).map_batches(lambda b: {"first": [b["id"][0]], "n": [len(b["id"])]},
                                         batch_size=8)
        calls = sorted((int(r["first"]), int(r["n"])) for r in ds.take_all())
    finally:
        ray.shutdown()
    assert calls == [(0, 8), (8, 8), (16, 8), (24, 8), (32, 8), (40, 4)]
