"""q/k/v (and Llama's gate/up) laid out in one buffer and multiplied as one GEMM."""
import torch

from conftest import ragged_prompts
from flexrun import LLM, Policy, SamplingParams
from flexrun.models.common import joined as _joined, linear, linear_rows
from flexrun.memory.storage import TieredStore


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
    with LLM(str(llama_dir), device="cpu", policy="resident") as llm:
        homes = llm.weights.homes
        for group in (("q", "k", "v"), ("gate", "up")):
            assert _joined([homes[f"layers.1.{g}.weight"][1] for g in group]) is not None
        ref = [o.output_ids for o in llm.generate(prompts, 6, greedy)]
    pol = Policy(weights_gpu=0, weights_cpu=100)     # nothing resident: nothing joined
    with LLM(str(llama_dir), device="cpu", policy=pol) as llm:
        assert _joined([llm.weights.homes[f"layers.1.{g}.weight"][1] for g in "qkv"]) is None
        assert [o.output_ids for o in llm.generate(prompts, 6, greedy)] == ref


def test_compressed_rows_join_and_give_the_separate_linears():
    """4-bit q/k/v join part by part (codes, mins, scales) and multiply as one matrix; the
    same products as one linear each."""
    from flexrun.memory.quant import Compressed, compress
    st = TieredStore(torch.device("cpu"), None, pin=False)
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate("qkv"):
        st.put(f"{n}.weight", compress(torch.randn(8 + 64 * i, 128, generator=g), 4, 64), "gpu")
    x = torch.randn(2, 3, 128)
    ws = [st.fetch(f"{n}.weight") for n in "qkv"]
    ref = [linear(x, w) for w in ws]
    assert _joined(ws) is None
    assert st.join([f"{n}.weight" for n in "qkv"])
    ws = [st.fetch(f"{n}.weight") for n in "qkv"]
    j = _joined(ws)
    assert isinstance(j, Compressed) and j.shape == (8 + 72 + 136, 128)
    for got, want in zip(linear_rows(x, ws, [None] * 3), ref):
        torch.testing.assert_close(got, want)
    # other group sizes, or a plain tensor among them: not joined, nothing changes
    st.put("q2.weight", compress(torch.randn(8, 128, generator=g), 4, 32), "gpu")
    before = st.fetch("q2.weight")
    assert not st.join(["q2.weight", "k.weight"]) and st.fetch("q2.weight") is before
    st.put("p.weight", torch.randn(8, 128, generator=g), "gpu")
    assert not st.join(["p.weight", "k.weight"])


def test_compressed_resident_run_joins_and_matches_offloaded(llama_dir):
    prompts, greedy = ragged_prompts(5), SamplingParams(ignore_eos=True)
    runs = []
    for pol in (Policy(compress_weight=True), Policy(compress_weight=True, weights_gpu=0,
                                                     weights_cpu=100)):
        with LLM(str(llama_dir), device="cpu", policy=pol) as llm:
            homes = llm.weights.homes
            joined = _joined([homes[f"layers.1.{g}.weight"][1] for g in "qkv"])
            assert (joined is not None) == (pol.weights_gpu == 100)
            runs.append([o.output_ids for o in llm.generate(prompts, 6, greedy)])
    assert runs[0] == runs[1]


def test_joined_slots_lay_out_the_largest_group_on_the_device():
    from flexrun.plan.placement import JoinedSlots
    pairs = [["e0.gate", "e0.up"], ["e1.gate", "e1.up"]]
    layer = ["e0.gate", "e0.up", "e1.gate", "e1.up"]
    shapes = {n: (2 + i, 4) for i, n in enumerate(layer)}
    gpu = {n: "gpu" for n in layer}
    slots = JoinedSlots([*pairs, layer], shapes, gpu, torch.float32, torch.device("cpu"))
    assert slots.groups == [layer] and all(slots.covers(g) for g in [*pairs, layer])
    views = [slots.fill(n, torch.full(shapes[n], float(i))) for i, n in enumerate(layer)]
    assert _joined(views) is not None and _joined(views).shape == (14, 4)
    assert [float(v[0, 0]) for v in views] == [0.0, 1.0, 2.0, 3.0]
    # e1 lives off the device: the layer is not laid out, e0's pair still is
    slots = JoinedSlots([*pairs, layer], shapes, {**gpu, "e1.up": "cpu"}, torch.float32,
                        torch.device("cpu"))
    assert slots.groups == [pairs[0]] and not slots.covers(layer) and "e1.gate" not in slots


def test_resident_moe_load_copies_each_tensor_once(tmp_path, monkeypatch):
    """A resident MoE layer's experts land straight in their stacked buffer: no join copies
    after the load (which would hold two copies of a layer's experts at once)."""
    from families import save_family
    joins = []
    monkeypatch.setattr(TieredStore, "join", lambda self, names: joins.append(names))
    d = save_family("qwen3_moe", tmp_path / "m")
    with LLM(str(d), device="cpu", policy="resident") as llm:
        homes = llm.weights.homes
        E = llm.spec.num_experts
        stacked = [homes[f"layers.0.experts.{e}.{p}.weight"][1] for e in range(E)
                   for p in ("gate", "up")]
        assert _joined(stacked) is not None and _joined(
            [homes[f"layers.0.{g}.weight"][1] for g in "qkv"]) is not None
    assert joins == []
