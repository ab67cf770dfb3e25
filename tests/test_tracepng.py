"""`--trace` writes a Chrome trace with every track; `flexrun trace-png` renders it."""
import json

import pytest

from conftest import ragged_prompts
from flexrun import LLM, Policy, SamplingParams
from flexrun.cli import main


def test_trace_then_png(llama_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    trace = tmp_path / "t.json"
    pol = Policy(weights_gpu=0, weights_disk=100, gpu_batch_size=2, num_gpu_batches=2)
    with LLM(str(llama_dir), device="cpu", policy=pol, offload_dir=str(tmp_path),
             trace=str(trace)) as llm:
        llm.generate(ragged_prompts(4), 3, SamplingParams(ignore_eos=True))
    events = json.loads(trace.read_text())["traceEvents"]
    tracks = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert {"compute", "io-thread"} <= tracks
    assert any(e["ph"] == "X" and e["name"].startswith("load w") for e in events)
    png = tmp_path / "t.png"
    assert main(["trace-png", str(trace), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from flexrun.cli.trace_png import load_events, step_window
    spans = load_events(trace)[1]
    one = step_window(spans, 1)
    assert {e["name"] for e in one if e["name"].startswith("s")} == \
        {e["name"] for e in spans if e["name"].startswith("s1 ")}
    assert len(one) < len(spans)
    assert main(["trace-png", str(trace), "-o", str(png), "--step", "1"]) == 0
    assert main(["trace-png", str(trace), "-o", str(png), "--step", "9"]) == 2
    assert "pass one of those to --step" in capsys.readouterr().err


def test_missing_trace_is_one_line_error(tmp_path, capsys):
    assert main(["trace-png", str(tmp_path / "nope.json"), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not found" in err
