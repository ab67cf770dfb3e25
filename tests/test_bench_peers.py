"""The Accelerate peer on a tiny OPT shape: runs on CPU with disk offload, and its greedy tokens
are flexrun's (same synthetic weights, same prompts)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")


def test_accelerate_peer_disk_offload_matches_flexrun(monkeypatch, tmp_path) -> None:
    from flexrun import LLM, SamplingParams
    from flexrun.models import dummy
    monkeypatch.setitem(dummy._OPT, "opt-tiny", (64, 2, 4, 256))   # hidden, layers, heads, ffn
    from bench.peers.accelerate_peer import parser, run
    # 13.5 MB: the embedding (12.9 MB fp32) stays on the CPU, the decoder layers go to disk
    r = run(parser().parse_args([
        "--model", "opt-tiny", "--prompt-len", "8", "--gen-len", "3", "--batch-size", "2",
        "--num-prompts", "2", "--cpu-mem", "13.5MB", "--device", "cpu",
        "--offload-dir", str(tmp_path)]))
    assert r["placement"]["layers"] == {"disk": 2}
    assert r["placement"]["other"]["model.decoder.embed_tokens"] == "cpu"
    assert r["total_tok_s"] > 0 and r["prefill_s"] > 0 and r["decode_s"] > 0
    assert list(tmp_path.iterdir()) == []            # the offload folder is gone
    g = torch.Generator().manual_seed(0)             # the peer's (and run_flexrun's) prompts
    ids = torch.randint(10, 30000, (2, 8), generator=g).tolist()
    with LLM("dummy:opt-tiny", device="cpu", policy="resident") as llm:
        out = llm.generate(ids, 3, SamplingParams(ignore_eos=True))
    assert out[0].output_ids == r["first_tokens"]


def test_peers_do_not_inherit_flexruns_allocator_default(monkeypatch) -> None:
    """bench.run imports flexrun, which defaults PYTORCH_CUDA_ALLOC_CONF; peer processes get
    the user's environment (their own value kept, flexrun's default dropped)."""
    import flexrun
    from bench.system_proc import child_env
    monkeypatch.setattr(flexrun, "ALLOC_CONF_SET_BY_FLEXRUN", True)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in child_env()
    monkeypatch.setattr(flexrun, "ALLOC_CONF_SET_BY_FLEXRUN", False)
    assert child_env()["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
