"""bench/accuracy.py: its agreement metrics and one end-to-end run on the tiny Llama (the real
SmolLM2 numbers come from `python -m bench.accuracy`, see docs/accuracy.md); the Q4_1 -> 4-bit
group exactness that docs/accuracy.md states, for round-to-nearest and the weight searches."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType

from flexrun.models.gguf import _dequantize, _reader
from flexrun.memory.quant import compress, decompress
from flexrun.memory.wquant import quantize

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
                   "--stride", "16", "--prefill", "8", "--prompts", "3", "--prompt-len", "12",
                   "--new-tokens", "4", "--out", str(out)]
                  + (["--all-paths"] if all_paths else []))
    res = json.loads(out.read_text())
    assert res["complete"]
    rows = {r["path"]: r for r in res["rows"]}
    noop = [v.name for v in accuracy.VARIANTS if v.host_noop]
    assert res["skipped"] == ([] if all_paths else noop)
    assert set(rows) == {"resident"} | {v.name for v in accuracy.VARIANTS} - set(res["skipped"])
    for name, r in rows.items():
        assert len(r["outputs"]) == 3 and all(len(o) == 4 for o in r["outputs"])
        assert r["decode_tokens"] == r["tokens_scored"] - 7        # all but the first prefill
        lossless = not r["policy"]["compress_weight"] and not r["policy"]["compress_cache"]
        if lossless:                                 # every lossless placement: exact
            assert r["bit_identical"] and r["agree"] == 1.0, name
            assert r["scheme"] == "-"           # decode attention's sums may round otherwise
            assert r["decode_ppl"] == pytest.approx(rows["resident"]["decode_ppl"], rel=1e-6)
        if r["policy"]["compress_cache"] and not r["policy"]["compress_weight"]:
            assert r["ppl"] == rows["resident"]["ppl"], name      # prefill reads exact K/V
    res = rows["resident"]
    assert abs(res["decode_ppl"] / res["ppl"] - 1) < 0.2
    assert rows["compress weight, rtn (FlexGen)"]["ppl"] != res["ppl"]
    assert rows["compress cache, kivi, window 0, no sink"]["decode_ppl"] != res["decode_ppl"]
    assert "kv kivi g64 win 64 sink 4" in rows["compress cache, kivi, window 64"]["scheme"]
    assert "kv kivi g32 win 32 sink 4" in rows["compress cache, kivi g32, window 32 (default)"][
        "scheme"]
    assert rows["weights on disk"]["policy"]["weights_disk"] == 100.0
    assert len(res["outputs"]) == 3 and len(json.loads(out.read_text())["prompts"][0]) == 12
    table = capsys.readouterr().out
    assert table.count("\n| ") == len(rows) + 1 and "window 24, stride 16" in table
    assert "perplexity (decode path)" in table
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
    # the searches keep every exactly representable group (and so the whole tensor)
    for t in q41[:2]:
        w = torch.from_numpy(_dequantize(t))
        for scheme in ("hqq", "synth"):
            c = quantize(w, 4, 32, scheme, torch.rand(w.shape[1]))
            assert torch.equal(decompress(c), w), (t.name, scheme)


def test_variant_specs():
    v = accuracy.parse_variant("compress_cache=true,cache_window=48,cache_scheme=per_token")
    assert v.overrides == dict(compress_cache=True, cache_window=48, cache_scheme="per_token")
    assert v.name == "compress_cache=true,cache_window=48,cache_scheme=per_token"
    with pytest.raises(SystemExit):
        accuracy.parse_variant("compress_cache")


def test_rows_are_written_as_they_finish(llama_dir, tmp_path, monkeypatch):
    """A run stopped early (a device call's time limit) keeps every row it finished: the JSON
    is rewritten after each row, marked incomplete until the end."""
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 6)
    out = tmp_path / "acc.json"
    real, seen = accuracy.run_path, []

    def stop_at_third(job, name, *args):
        if len(seen) == 2:
            seen.append(json.loads(out.read_text()))
            raise KeyboardInterrupt
        seen.append(name)
        return real(job, name, *args)
    monkeypatch.setattr(accuracy, "run_path", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        accuracy.main(["--model", str(llama_dir), "--text", str(text), "--window", "24",
                       "--stride", "16", "--prefill", "8", "--prompts", "2", "--prompt-len",
                       "12", "--new-tokens", "2", "--out", str(out)])
    partial = seen[2]
    assert not partial["complete"] and len(partial["rows"]) == 2
    assert [r["path"] for r in partial["rows"]] == seen[:2]
