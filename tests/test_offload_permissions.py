"""Offload files are private: the run directory is 0700 and every file in it 0600, whatever the
process umask (weights, KV cache, activations and the .lock)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from flexrun import LLM, Policy, SamplingParams
from flexrun.engine.kvcache import KVSlot
from flexrun.memory.disk import DiskTier

ALL_DISK = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_gpu=0, weights_cpu=0,
                  weights_disk=100, cache_gpu=0, cache_cpu=0, cache_disk=100, act_gpu=0,
                  act_cpu=0, act_disk=100)
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]


@pytest.fixture
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    """Permission bits of every directory and file under root, the run dirs included."""
    out = {}
    for d in root.glob("flexrun-run-*"):
        out[d.name + "/"] = stat.S_IMODE(d.lstat().st_mode)
        for p in d.rglob("*"):
            out[f"{d.name}/{p.relative_to(d)}" + ("/" if p.is_dir() else "")] = \
                stat.S_IMODE(p.lstat().st_mode)
    return out


@pytest.mark.parametrize("umask", [0o022, 0o000, 0o277], indirect=True,
                         ids=["umask022", "umask000", "umask277"])
def test_offload_files_private_whatever_the_umask(opt_dir, tmp_path, monkeypatch, umask):
    seen: dict[str, int] = {}

    def snapshot():
        seen.update(_modes(tmp_path))

    def after(fn):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            snapshot()
            return out
        return wrapped
    # look while the run is open: after every offload write (weights, activations, KV cache)
    monkeypatch.setattr(DiskTier, "write", after(DiskTier.write))
    monkeypatch.setattr(KVSlot, "write", after(KVSlot.write))
    with LLM(str(opt_dir), device="cpu", policy=ALL_DISK, offload_dir=str(tmp_path)) as llm:
        snapshot()
        outs = llm.generate(PROMPTS, max_new_tokens=3, sampling=SamplingParams(ignore_eos=True))
        snapshot()
    assert all(len(o.output_ids) == 3 for o in outs)
    assert list(tmp_path.iterdir()) == []               # removed on close
    dirs = {k: m for k, m in seen.items() if k.endswith("/")}
    files = {k: m for k, m in seen.items() if not k.endswith("/")}
    assert len(dirs) == 1, dirs
    assert {oct(m) for m in dirs.values()} == {"0o700"}, dirs
    bad = {k: oct(m) for k, m in files.items() if m != 0o600}
    assert not bad, bad
    names = [k.split("/", 1)[1] for k in files]
    assert ".lock" in names
    for kind in ("kv-", "act-", "fc1"):             # KV cache, activations, weights
        assert any(kind in n for n in names), (kind, sorted(names)[:20])
