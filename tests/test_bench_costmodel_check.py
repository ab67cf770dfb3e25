"""bench.costmodel_check's plumbing: one pair on the CPU writes the table's JSON. The profile
is the shipped one (no timing here) and no timing is asserted."""
from __future__ import annotations

import json

import bench.costmodel_check as check
from flexrun.plan.hardware import default_profile


def test_one_pair_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(check, "measure", lambda *a, **kw: default_profile("cpu"))
    # the bench's rows at shorter lengths (the same models and policies)
    monkeypatch.setattr(check, "CPU_ROWS", {n: (m, pol, 16, 3)
                                            for n, (m, pol, _, _) in check.CPU_ROWS.items()})
    out = tmp_path / "check.json"
    res = check.main(["--pairs", "1", "-o", str(out), "--offload-dir", str(tmp_path)])
    d = json.loads(out.read_text())
    assert d == json.loads(json.dumps(res))
    assert d["device"] == "cpu" and d["command"].startswith("python -m bench.costmodel_check")
    assert {"date", "profile", "others_cores", "load_avg_start", "load_avg_end"} <= set(d)
    assert [r["name"] for r in d["rows"]] == ["opt-125m disk", "opt-125m resident"]
    for row in d["rows"]:
        assert row["model"] == "dummy:opt-125m" and row["num_prompts"] == 4
        assert (row["prompt_len"], row["gen_len"]) == (16, 3)
        (pair,) = row["pairs"]
        for part in ("predicted", "measured"):
            assert set(pair[part]) == {"prefill_s", "decode_s"}
            assert all(v > 0 for v in pair[part].values())
        assert set(pair["ratio"]) == set(row["median_ratio"]) == {"prefill", "decode"}
        assert pair["ratio"] == row["median_ratio"]
        assert set(pair["breakdown"]) == {"prefill", "decode"}
        assert "profile" in pair and isinstance(pair["others_cores"], float)
    disk, resident = d["rows"]
    assert disk["policy"]["weights_disk"] == 100 and resident["policy"]["weights_cpu"] == 100
    assert disk["pairs"][0]["breakdown"]["decode"]["weights"] > 0
    assert resident["pairs"][0]["breakdown"]["decode"]["weights"] == 0
    assert not list(tmp_path.glob("flexrun-check-*"))           # the offload dir is removed
    text = capsys.readouterr().out
    assert "decode step s pred/meas" in text and f"wrote {out}" in text
