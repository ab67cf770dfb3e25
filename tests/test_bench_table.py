"""bench.table pairs flexrun with the peers of the same result file and computes the ratios."""
import json

from bench.table import markdown, rows


def test_rows_pair_systems_of_one_file(tmp_path):
    res = {"scenario": "S9", "prompt_len": 512, "gen_len": 32, "accelerate_best": "accelerate-b8",
           "flexrun-auto": {"total_tok_s": 30.0, "decode_tok_s": 40.0, "peak_gpu_GB": 15.0},
           "accelerate": {"total_tok_s": 1.0, "decode_tok_s": 1.0},
           "accelerate-b8": {"total_tok_s": 1.5, "decode_tok_s": 2.0, "extrapolated": True,
                             "peak_gpu_GB": 20.0},
           "flexgen": {"error": "timed out"}}
    (tmp_path / "S9-NVIDIA-H200.json").write_text(json.dumps(res))
    (tmp_path / "notes.json").write_text("[1, 2]")
    table = rows(tmp_path)
    assert [(r["ours"], r["peer"]) for r in table] == [("flexrun-auto", "accelerate-b8")]
    text = markdown(table)
    assert "| S9 (flexrun-auto) | NVIDIA-H200 | 512/32 |" in text
    assert "20.00x (20.00x)" in text and "decode extrapolated" in text and "15.0 / 20.0" in text
    assert rows(tmp_path, ["cpu"]) == []


def test_a_peer_without_flexrun_is_listed_with_the_reason(tmp_path):
    res = {"scenario": "S9", "prompt_len": 512, "gen_len": 32,
           "flexrun-auto": {"error": "timed out after 185 s"},
           "accelerate-b8": {"total_tok_s": 1.5, "decode_tok_s": 2.0}}
    (tmp_path / "S9-NVIDIA-H200.json").write_text(json.dumps(res))
    (tmp_path / "S8-NVIDIA-H200.json").write_text(json.dumps(
        {"scenario": "S8", "airllm": {"total_tok_s": 0.5, "decode_tok_s": 0.4}}))
    text = markdown(rows(tmp_path))
    assert "| S8 | NVIDIA-H200 | None/None | not run | airllm | 0.50 (0.40) | - |" in text
    assert ("| S9 | NVIDIA-H200 | 512/32 | timed out after 185 s | accelerate-b8 | 1.50 (2.00) "
            "| - |") in text


def test_variant_files_are_skipped_and_cut_runs_are_extrapolated(tmp_path):
    """A variant's file (S9-ab-<device>.json, its scenario S9) is no row of its own; a peer cut
    short by FlexGen's --cut-gen-len counts as extrapolated."""
    from bench.table import extrapolated
    res = {"scenario": "S9", "prompt_len": 512, "gen_len": 32,
           "flexrun": {"total_tok_s": 30.0, "decode_tok_s": 40.0},
           "flexgen": {"total_tok_s": 3.0, "decode_tok_s": 4.0,
                       "args": {"gen_len": 32, "cut_gen_len": 8}}}
    (tmp_path / "S9-NVIDIA-H200.json").write_text(json.dumps(res))
    (tmp_path / "S9-ab-NVIDIA-H200.json").write_text(json.dumps(res))
    table = rows(tmp_path)
    assert [r["device"] for r in table] == ["NVIDIA-H200"] and table[0]["extrapolated"]
    assert not extrapolated({"args": {"gen_len": 32, "cut_gen_len": 32}})
    assert not extrapolated({"args": {"gen_len": 32, "cut_gen_len": None}})
