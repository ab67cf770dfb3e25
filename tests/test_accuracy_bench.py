"""bench/accuracy.py: its agreement metrics and one end-to-end run on the tiny Llama (the real
SmolLM2 numbers come from `python -m bench.accuracy`, see docs/accuracy.md); the Q4_1 -> 4-bit
group exactness that docs/accuracy.md states."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType

from flexrun.models.gguf import _dequantize, _reader
from flexrun.memory.quant import compress, decompress

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import accuracy  # noqa: E402


def test_agreement_and_common_prefix():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert accuracy.agreement(ref, ref) == accuracy.common_prefix(ref, ref) == 1.0
    got = [[1, 2, 9, 4], [0, 6, 7, 8]]          # 6 of 8 positions equal
    assert accuracy.agreement(got, ref) == pytest.approx(6 / 8)
    assert accuracy.common_prefix(got, ref) == pytest.approx((2 / 4 + 0 / 4) / 2)
    assert accuracy.agreement([[1, 2]], [[1, 2, 3, 4]]) == pytest.approx(2 / 4)


@pytest.mark.parametrize("all_paths", [False, True])
def test_end_to_end_tiny_llama(llama_dir, tmp_path, all_paths, capsys):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 6)
    out = tmp_path / "acc.json"
    accuracy.main(["--model", str(llama_dir), "--text", str(text), "--window", "24",
                   "--stride", "16", "--prompts", "3", "--new-tokens", "4", "--out", str(out)]
                  + (["--all-paths"] if all_paths else []))
    res = json.loads(out.read_text())
    rows = {r["path"]: r for r in res["rows"]}
    noop = [v.name for v in accuracy.VARIANTS if v.host_noop]
    assert res["skipped"] == ([] if all_paths else noop)
    assert set(rows) == {"resident"} | {v.name for v in accuracy.VARIANTS} - set(res["skipped"])
    for name, r in rows.items():
        assert len(r["outputs"]) == 3 and all(len(o) == 4 for o in r["outputs"])
        if not r["policy"]["compress_weight"]:       # every lossless placement: exact
            assert r["bit_identical"] and r["agree"] == 1.0, name
    assert rows["compress weight (4-bit, g64)"]["ppl"] != rows["resident"]["ppl"]
    assert rows["weights on disk"]["policy"]["weights_disk"] == 100.0
    table = capsys.readouterr().out
    assert table.count("\n| ") == len(rows) + 1 and "window 24, stride 16" in table
    assert ("Not run on a CPU-only device" in table) != all_paths


def test_q4_1_blocks_requantize_exactly_with_group_32(smollm2_gguf):
    """docs/accuracy.md's claim: flexrun's 4-bit min-max groups of 32 along the input dim are
    the GGUF's Q4_1 blocks (fp16 min, fp16 scale = (max-min)/15, codes 0..15), so compressing the
    dequantized weights reproduces them bit for bit; groups of 64 straddle two blocks and do not."""
    q41 = [t for t in _reader(smollm2_gguf).tensors if t.name.startswith("blk.0.")
           and t.tensor_type == GGMLQuantizationType.Q4_1]
    assert len(q41) == 7                               # q, k, v, o, gate, up, down
    for t in q41:
        w = torch.from_numpy(_dequantize(t))
        assert torch.equal(decompress(compress(w, 4, 32, dim=-1)), w), t.name
        assert not torch.equal(decompress(compress(w, 4, 64, dim=-1)), w), t.name
