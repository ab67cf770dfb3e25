"""q/k/v (and Llama's gate/up) laid out in one buffer and multiplied as one GEMM."""
import torch

from conftest import ragged_prompts
from flexrun import LLM, Policy, SamplingParams
from flexrun.models.common import _joined, linear, linear_rows
from flexrun.storage import TieredStore


def _store(tiers=("gpu", "gpu", "gpu")):
    st = TieredStore(torch.device("cpu"), None, pin=False)
    g = torch.Generator().manual_seed(0)
    for i, (n, tier) in enumerate(zip("qkv", tiers)):
        st.put(f"{n}.weight", torch.randn(8 + 4 * i, 16, generator=g), tier)
        st.put(f"{n}.bias", torch.randn(8 + 4 * i, generator=g), tier)
    return st


def test_joined_rows_give_the_separate_linears():
    st = _store()
    x = torch.randn(3, 5, 16)
    ws = [st.fetch(f"{n}.weight") for n in "qkv"]
    bs = [st.fetch(f"{n}.bias") for n in "qkv"]
    ref = [linear(x, w, b) for w, b in zip(ws, bs)]
    assert _joined(ws) is None                      # separate allocations: one GEMM each
    assert st.join([f"{n}.weight" for n in "qkv"]) and st.join([f"{n}.bias" for n in "qkv"])
    ws = [st.fetch(f"{n}.weight") for n in "qkv"]
    bs = [st.fetch(f"{n}.bias") for n in "qkv"]
    assert _joined(ws).shape == (36, 16) and _joined(bs).shape == (36,)
    for got, want in zip(linear_rows(x, ws, bs), ref):
        torch.testing.assert_close(got, want)
    assert _joined(ws[::-1]) is None                # out of order: one GEMM each, still right
    for got, want in zip(linear_rows(x, ws[::-1], bs[::-1]), ref[::-1]):
        torch.testing.assert_close(got, want)


def test_join_refuses_what_it_cannot_lay_out():
    st = _store(("gpu", "cpu", "gpu"))
    before = st.fetch("q.weight")
    assert not st.join([f"{n}.weight" for n in "qkv"])
    assert st.fetch("q.weight") is before
    ws = [st.fetch(f"{n}.weight") for n in "qkv"]
    assert _joined(ws) is None


def test_resident_run_joins_and_matches_offloaded(llama_dir, tmp_path):
    prompts, greedy = ragged_prompts(5), SamplingParams(ignore_eos=True)
    with LLM(str(llama_dir), device="cpu") as llm:
        homes = llm.weights.homes
        for group in (("q", "k", "v"), ("gate", "up")):
            assert _joined([homes[f"layers.1.{g}.weight"][1] for g in group]) is not None
        ref = [o.output_ids for o in llm.generate(prompts, 6, greedy)]
    pol = Policy(weights_gpu=0, weights_cpu=100)     # nothing resident: nothing joined
    with LLM(str(llama_dir), device="cpu", policy=pol) as llm:
        assert _joined([llm.weights.homes[f"layers.1.{g}.weight"][1] for g in "qkv"]) is None
        assert [o.output_ids for o in llm.generate(prompts, 6, greedy)] == ref
