"""The decode-path score (LLM.score_decode, eval-ppl --decode): teacher forcing through real
decode steps equals the prefill score on every lossless path and moves with a compressed
cache, which the prefill score never reads."""
import json
import math

import pytest
import torch

from conftest import VOCAB
from flexrun import LLM, Policy, SamplingParams
from flexrun.cli.eval_ppl import decode_terms, perplexity_terms, windows
from flexrun.cli.main import main
from flexrun.engine.sampling import Row, Sampler

PREFILL = 6
LOSSLESS = {
    "resident": {},
    "weights/cache/act on disk": dict(weights_gpu=0, weights_disk=100, cache_gpu=0,
                                      cache_disk=100, act_gpu=0, act_disk=100),
    "cache on cpu + cpu attention, 2x2": dict(cache_gpu=0, cache_cpu=100, cpu_attention=True,
                                              gpu_batch_size=2, num_gpu_batches=2),
    "30/40/30, no overlap": dict(weights_gpu=30, weights_cpu=40, weights_disk=30, cache_gpu=30,
                                 cache_cpu=40, cache_disk=30, act_gpu=30, act_cpu=40,
                                 act_disk=30, overlap=False, gpu_batch_size=3),
}


def sequences(n: int = 4, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (L,), generator=g).tolist() for L in (30, 19, 41, 9)[:n]]


def prefill_logprobs(llm: LLM, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Each token's log-probability after the prefill, from the prefill path's logits."""
    out = []
    for s, lg in zip(seqs, llm.prompt_logits(seqs)):
        lp = torch.log_softmax(lg[PREFILL - 1:-1].double(), -1)
        out.append(lp.gather(-1, torch.tensor(s[PREFILL:])[:, None])[:, 0])
    return out


@pytest.mark.parametrize("path", list(LOSSLESS))
def test_decode_score_equals_prefill_score(llama_dir, tmp_path, path):
    seqs = sequences()
    with LLM(str(llama_dir), device="cpu", policy=Policy(**LOSSLESS[path]),
             offload_dir=str(tmp_path)) as llm:
        dec = llm.score_decode(seqs, PREFILL)
        ref = prefill_logprobs(llm, seqs)
    for s, d, r in zip(seqs, dec, ref):
        assert len(d) == len(s) - PREFILL
        assert torch.allclose(torch.tensor(d, dtype=torch.float64), r, rtol=1e-5, atol=1e-5)
        assert sum(d) == pytest.approx(float(r.sum()), rel=1e-5)


def test_compressed_cache_moves_decode_score_only(llama_dir):
    seqs = sequences()
    pol = Policy(compress_cache=True, cache_group=4, cache_window=0, cache_sink=0)
    with LLM(str(llama_dir), device="cpu", policy=pol) as llm:
        dec = llm.score_decode(seqs, PREFILL)
        ref = prefill_logprobs(llm, seqs)
    with LLM(str(llama_dir), device="cpu", policy="resident") as llm:
        assert all(torch.equal(a, b) for a, b in zip(ref, prefill_logprobs(llm, seqs)))
    # the first scored token comes from the prefill's exact attention, the rest read the cache
    for d, r in zip(dec, ref):
        assert d[0] == pytest.approx(float(r[0]), rel=1e-6)
    assert any(abs(sum(d) - float(r.sum())) > 1e-4 for d, r in zip(dec, ref))


def test_forced_rows_return_the_given_tokens():
    forced = [5, 9, 2]
    s = Sampler({0: Row(SamplingParams(temperature=1.0, seed=3), forced=forced),
                 1: Row(SamplingParams())}, eos_ids=[])
    assert s.wants_logprobs
    logits = torch.randn(2, 12, generator=torch.Generator().manual_seed(0))
    for step in range(4):
        out = s(logits, [0, 1])
        assert out[0] == forced[min(step, 2)] and out[1] == logits[1].argmax()
    picked = s.logprobs(logits, out)
    assert picked.logprob[0] == pytest.approx(float(torch.log_softmax(logits[0], -1)[2]))


def test_decode_terms_cover_the_text_after_the_first_prefill(llama_dir):
    ids = sequences(1, seed=4)[0] * 3                      # 90 tokens
    with LLM(str(llama_dir), device="cpu") as llm:
        nll, n = decode_terms(llm, ids, 24, 24 - PREFILL, PREFILL)
        assert n == len(ids) - PREFILL
        # the same tokens scored from prefill logits: windows as decode_terms cuts them
        ref, count = 0.0, 0
        wins = windows(ids, 24, 24 - PREFILL)
        for (w, k), lg in zip(wins, llm.prompt_logits([w for w, _ in wins])):
            k = min(k, len(w) - PREFILL)
            lp = torch.log_softmax(lg[:-1].double(), -1).gather(
                -1, torch.tensor(w[1:])[:, None])[:, 0]
            ref -= float(lp[-k:].sum())
            count += k
        pnll, pcount = perplexity_terms(llm, ids, 24, 24 - PREFILL)
    assert count == n and nll == pytest.approx(ref, rel=1e-5)
    assert pcount == len(ids) - 1          # every token but the first, once


def test_cli_eval_ppl_decode(llama_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    rc = main(["eval-ppl", "--model", str(llama_dir), "--text", str(text), "--device", "cpu",
               "--window", "32", "--stride", "24", "--decode", "--prefill", "8"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prefill"] == 8 and math.isfinite(out["decode_ppl"])
    assert out["decode_ppl"] == pytest.approx(out["ppl"], rel=0.5)
    assert out["decode_tokens"] < out["tokens"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("path", ["resident", "cache on cpu + cpu attention, 2x2"])
def test_cuda_decode_score_equals_prefill_score(llama_dir, tmp_path, path):
    seqs = sequences()
    with LLM(str(llama_dir), device="cuda", dtype="fp32", policy=Policy(**LOSSLESS[path]),
             offload_dir=str(tmp_path)) as llm:
        dec = llm.score_decode(seqs, PREFILL)
        ref = prefill_logprobs(llm, seqs)
    for d, r in zip(dec, ref):
        assert sum(d) == pytest.approx(float(r.sum()), rel=1e-4)
