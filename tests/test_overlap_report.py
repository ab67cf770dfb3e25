"""bench.overlap_report: per-step busy time of each track, overlapping spans counted once."""
import json

from bench.overlap_report import track_busy


def _trace(tmp_path, spans):
    tracks = sorted({t for _, t, _, _ in spans})
    ev = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": i, "args": {"name": t}}
          for i, t in enumerate(tracks)]
    ev += [{"name": n, "ph": "X", "pid": 0, "tid": tracks.index(t), "ts": a, "dur": b - a}
           for n, t, a, b in spans]
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"traceEvents": ev}))
    return str(p)


def test_track_busy_counts_overlaps_once_per_step(tmp_path):
    path = _trace(tmp_path, [
        ("s0 u0 b0", "compute", 0, 1000),                 # the prefill
        ("s1 u0 attention", "compute", 2000, 3000),
        ("s1 u0 b0", "compute", 3000, 4000),
        ("h2d experts l0 x5", "expert-copies", 2000, 3500),
        ("h2d experts l0 x3 ahead", "expert-copies", 3200, 3800),   # overlaps the one above
        ("attn l0", "cpu-attn", 9000, 9500),               # outside every step's window
        ("s2 u0 b0", "compute", 5000, 5500)])
    rows = track_busy(path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["wall_ms"] == 1.0 and rows[0]["expert-copies"] == 0.0
    assert rows[1]["wall_ms"] == 2.0
    assert rows[1]["expert-copies"] == 1.8 and rows[1]["compute"] == 2.0
    assert rows[1]["cpu-attn"] == 0.0 and rows[2]["expert-copies"] == 0.0


def test_bench_run_trace_keeps_the_trace_and_adds_each_steps_tracks(tmp_path, monkeypatch):
    """`bench.run S --trace`: a flexrun system runs traced, its result gets each step's busy
    time per track, and the trace stays beside it, gzipped."""
    import gzip
    import sys

    from bench import run
    monkeypatch.setitem(run.SCENARIOS, "T", {
        "what": "tiny", "prompt_len": 8, "gen_len": 3,
        "flexrun": ["--model", "dummy:opt-125m", "--policy", "auto", "--num-prompts", "2",
                    "--device", "cpu"]})
    monkeypatch.setattr(sys, "argv", ["bench.run", "T", "--only", "flexrun", "--trace",
                                      "--out-dir", str(tmp_path), "--timeout", "300"])
    run.main()
    res = json.loads((tmp_path / "T-cpu.json").read_text())
    tracks = res["flexrun"]["tracks"]
    assert [r["step"] for r in tracks] == [0, 1, 2]
    assert all(r["compute"] > 0 for r in tracks)
    events = json.load(gzip.open(tmp_path / "T-flexrun.trace.json.gz"))["traceEvents"]
    assert any(e["name"] == "s2 u0 b0" for e in events)
    assert not (tmp_path / "T-flexrun.trace.json").exists()
    assert track_busy(str(tmp_path / "T-flexrun.trace.json.gz")) == tracks    # read back
