"""The mixture-of-experts MLP (models/moe.py): the grouped expert computation against a plain
per-token reference, 4-bit experts, experts split over tiers, the routing statistics, the
fused expert names transformers 5 keeps in memory, and the drawn routing of dummy models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import ragged_prompts
from flexrun import LLM, FlexrunError, Policy, SamplingParams
from flexrun.models.moe import MoEStats, drawn_experts, moe_mlp, stacked_experts
from flexrun.models.spec import ModelSpec

GREEDY = SamplingParams(ignore_eos=True)


def moe_spec(router_kind: str, norm: bool = False, shared: int = 0, E: int = 6, k: int = 2,
             h: int = 32, f: int = 24) -> ModelSpec:
    return ModelSpec(arch="llama", family="qwen2_moe", vocab_size=16, hidden_size=h,
                     num_layers=1, num_heads=4, num_kv_heads=4, head_dim=h // 4, ffn_dim=f,
                     max_positions=16, num_experts=E, experts_per_token=k, expert_ffn_dim=f,
                     shared_expert_ffn_dim=shared, norm_topk_prob=norm, router_kind=router_kind)


def moe_weights(spec: ModelSpec, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n[len("layers.0."):]: torch.randn(s, generator=g) * (0.5 if "gate" in n else 0.2)
            for n, s in spec.unit_shapes(1).items()
            if n.split(".")[2] in ("router", "experts", "shared", "shared_gate")}


def per_token_reference(x: torch.Tensor, w: dict, spec: ModelSpec) -> torch.Tensor:
    """Each token on its own: Mixtral's softmax over the top-k logits, or Qwen's softmax over
    all, top-k, renormalised when norm_topk_prob; the weighted experts plus the shared one."""
    def mlp(v, p):
        return w[p + "down.weight"] @ (F.silu(w[p + "gate.weight"] @ v) * (w[p + "up.weight"] @ v))
    out = []
    for v in x.reshape(-1, x.shape[-1]):
        logits = w["router.weight"] @ v
        if spec.router_kind == "topk_softmax":
            top, idx = logits.topk(spec.experts_per_token)
            p = torch.softmax(top, -1)
        else:
            p, idx = torch.softmax(logits, -1).topk(spec.experts_per_token)
            p = p / p.sum() if spec.norm_topk_prob else p
        y = sum(p[j] * mlp(v, f"experts.{int(e)}.") for j, e in enumerate(idx))
        if spec.shared_expert_ffn_dim:
            y = y + torch.sigmoid(w["shared_gate.weight"] @ v) * mlp(v, "shared.")
        out.append(y)
    return torch.stack(out).view(x.shape)


@pytest.mark.parametrize("kind,norm,shared", [("topk_softmax", False, 0),
                                              ("softmax_topk", False, 40),
                                              ("softmax_topk", True, 0)])
def test_grouped_experts_match_per_token_reference(kind, norm, shared):
    spec = moe_spec(kind, norm, shared, E=6, k=3)
    w = moe_weights(spec)
    x = torch.randn(3, 7, spec.hidden_size, generator=torch.Generator().manual_seed(1))
    stats = MoEStats()
    got = moe_mlp(x, w, spec, stats)
    torch.testing.assert_close(got, per_token_reference(x, w, spec), atol=1e-5, rtol=1e-5)
    assert stats.calls == 1 and sum(stats.expert_tokens) == 21 * 3


def test_only_routed_experts_are_needed():
    """Experts no token picks are never read: their weights may be absent."""
    spec = moe_spec("topk_softmax", E=8, k=1)
    w = moe_weights(spec)
    x = torch.randn(2, spec.hidden_size, generator=torch.Generator().manual_seed(2))
    ref = moe_mlp(x, w, spec)
    picked = {int(e) for e in (x @ w["router.weight"].T).argmax(-1)}
    sparse = {n: t for n, t in w.items()
              if not n.startswith("experts.") or int(n.split(".")[1]) in picked}
    assert len(sparse) < len(w)
    torch.testing.assert_close(moe_mlp(x, sparse, spec), ref, atol=0, rtol=0)


def test_4bit_experts_and_dense_gates():
    from flexrun.memory.quant import compress, decompress
    from flexrun.plan.footprint import is_compressible
    spec = moe_spec("softmax_topk", True, shared=40)
    w = moe_weights(spec)
    assert not is_compressible("layers.0.router.weight", (6, 32))
    assert not is_compressible("layers.0.shared_gate.weight", (1, 32))
    assert is_compressible("layers.0.experts.5.down.weight", (32, 24))
    assert is_compressible("layers.0.shared.up.weight", (40, 32))
    wc = {n: compress(t, 4, 16, dim=-1) if is_compressible("layers.0." + n, t.shape) else t
          for n, t in w.items()}
    wd = {n: t if isinstance(t, torch.Tensor) else decompress(t) for n, t in wc.items()}
    x = torch.randn(9, spec.hidden_size, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(moe_mlp(x, wc, spec), moe_mlp(x, wd, spec), atol=1e-6, rtol=0)


def test_stats_count_a_known_routing():
    spec = moe_spec("topk_softmax", E=4, k=2, h=4)
    w = moe_weights(spec)
    w["router.weight"] = torch.eye(4) * 10
    x = torch.tensor([[3.0, 2, 0, 0], [0, 0, 1, 3], [3, 0, 2, 0]])   # {0,1}, {3,2}, {0,2}
    model_stats = MoEStats()
    moe_mlp(x, w, spec, model_stats)
    assert (model_stats.calls, model_stats.experts_touched) == (1, 4)
    assert model_stats.expert_tokens == [2, 1, 2, 1]
    moe_mlp(x[:1], w, spec, model_stats)
    assert (model_stats.calls, model_stats.experts_touched) == (2, 6)
    assert model_stats.expert_tokens == [3, 2, 2, 1]
    model_stats.reset()
    assert (model_stats.calls, model_stats.experts_touched) == (0, 0)


LANES = ["copy", "cpu", "staged", "staged-cpu", "read", "staged-read"]
# gpt-oss's experts (biases, clamped swiglu) and Llama 4's (input-scaled) take the per-expert
# route: no staged lanes (and
# the odd shape's prompts route to no disk expert: no reads to see there)
SPLITS = [(f, lanes) for f in ("mixtral", "mixtral-odd", "qwen2_moe", "qwen2_moe-odd",
                               "qwen3_moe", "qwen3_moe-odd", "olmoe", "glm4_moe")
          for lanes in LANES] + \
    [(f, lanes) for f in ("gpt_oss", "llama4") for lanes in ("copy", "cpu", "read")] + \
    [("gpt_oss-odd", lanes) for lanes in ("copy", "cpu")]


@pytest.mark.parametrize("family,lanes", SPLITS)
def test_experts_split_over_tiers_give_the_resident_tokens(tmp_path, family, lanes,
                                                            monkeypatch):
    """30/40/30 gpu/cpu/disk (on a CPU run the gpu tier is host memory): every layer's experts
    lie on several tiers, an expert's three matrices on one; the unit loads leave the
    off-device experts out, and only routed ones are copied (copy lane) or computed where
    they live (CPU lane), once per unit and block; "staged": the copy lane with every device
    expert of the unit put in stacked slots and run as grouped GEMMs (a GPU run's way), beside
    the CPU lane too; "read": disk experts read into host buffers by the reader threads
    rather than mapped (a GPU run's way), their copies issued after the device experts'
    GEMMs; the tokens and the prompt logits are the resident run's."""
    from flexrun.engine import experts as engine_experts
    from flexrun.engine import expert_staging
    from flexrun.engine import pipeline as engine_pipeline
    staged, read = lanes.startswith("staged"), lanes.endswith("read")
    monkeypatch.setattr(engine_pipeline, "MAP_DISK", not read)
    monkeypatch.setattr(engine_experts, "GROUPED_ON_CPU", staged)
    if lanes == "staged-cpu":       # grouped GEMMs of one expert at a time (a long prefill's)
        monkeypatch.setattr(expert_staging, "GROUPED_MAX_BYTES", 1)
    lanes = {"staged": "copy", "staged-cpu": "cpu", "read": "copy",
             "staged-read": "copy"}.get(lanes, lanes)
    from families import save_family
    d = save_family(family, tmp_path / "m")
    prompts = ragged_prompts(4, seed=3)
    with LLM(str(d), device="cpu", policy="resident") as llm:
        ref = [o.output_ids for o in llm.generate(prompts, 10, GREEDY)]
        ref_logits = llm.prompt_logits(prompts[:2])
        stats = llm.pipeline.model.moe_stats
        assert stats.routing == "router" and stats.calls > 0
        E = llm.spec.num_experts
        assert 0 < stats.experts_touched <= E * stats.calls
        j = llm.spec.first_moe_layer
        first = {n[len(f"layers.{j}."):]: llm.weights.fetch(n)
                 for n in llm.spec.unit_shapes(j + 1)}
        assert stacked_experts(first, E) is not None    # resident: grouped GEMMs
    pol = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_gpu=30, weights_cpu=40,
                 weights_disk=30, expert_lanes=lanes)
    (tmp_path / "off").mkdir()
    with LLM(str(d), device="cpu", policy=pol, offload_dir=str(tmp_path / "off")) as llm:
        L = llm.spec.num_layers
        per_expert = [{llm.weights.tier_of(f"layers.{j}.experts.{e}.{p}")
                       for p in llm.pipeline.experts.parts} for j in range(L)
                      for e in range(E) if llm.spec.is_moe(j)]
        away = llm.pipeline.experts.remote
        loaded = {n for names in llm.pipeline.unit_names.values() for n in names}
        outs = [o.output_ids for o in llm.generate(prompts, 10, GREEDY)]
        lane = llm.pipeline.experts.stats
        assert (llm.pipeline.experts.staging is not None) == staged
        logits = llm.prompt_logits(prompts[:2])
    assert all(len(t) == 1 for t in per_expert)
    assert set().union(*per_expert) == {"gpu", "cpu", "disk"}
    assert away and not any(f"layers.{j}.experts.{e}.gate.weight" in loaded
                            for j in away for e in away[j])
    if lanes == "copy":
        assert lane.copied > 0 and lane.cpu_runs == 0 and lane.reused > 0
        assert (lane.disk_reads > 0) == read and lane.disk_reads < lane.copied
    else:
        assert lane.cpu_runs > 0 and lane.copied == 0
    assert outs == ref
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_fused_in_memory_experts_load_as_per_expert(name):
    """transformers 5 holds each layer's experts stacked (gate_up_proj, down_proj) in memory
    and saves them per expert: both forms give the same canonical tensors."""
    from families import build_model
    from gguf_writer import checkpoint_tensors
    from flexrun.models.hf_config import spec_from_config
    from flexrun.models.loader import canonical_name, split_fused
    m = build_model(name)
    spec = spec_from_config(m.config.to_dict())

    def canonical(sd):
        return {n: t for k, v in sd.items() if (c := canonical_name(spec, k)) is not None
                for n, t in split_fused(spec, c, v)}
    fused, saved = canonical(m.state_dict()), canonical(checkpoint_tensors(m))
    assert any(".experts.gate_up_proj" in k for k in m.state_dict())
    want = {n for n in spec.all_shapes() if n != "head.lm_head" or not spec.tie_word_embeddings}
    assert set(saved) == want and set(fused) == want
    for n in want:
        assert torch.equal(fused[n], saved[n]), n


# ---- drawn routing (dummy models) -----------------------------------------------------------
def test_uniform_draws_touch_the_expected_number_of_experts():
    E, k = 128, 8
    for T in (1, 4, 16, 64):
        touched = []
        for trial in range(10):
            x = torch.randn(T, 64, generator=torch.Generator().manual_seed(100 * T + trial))
            _, idx = drawn_experts(x, E, k, "uniform")
            assert all(len(set(r)) == k for r in idx.tolist())
            touched.append(len(set(idx.flatten().tolist())))
        expected = E * (1 - (1 - k / E) ** T)
        assert abs(sum(touched) / len(touched) / expected - 1) < 0.05, (T, touched, expected)


def test_draws_are_deterministic_and_zipf_skews():
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(7))
    w, idx = drawn_experts(x, 64, 4, "uniform")
    assert torch.equal(drawn_experts(x.clone(), 64, 4, "uniform")[1], idx)
    assert torch.allclose(w, torch.full_like(w, 0.25))
    assert not torch.equal(drawn_experts(x, 64, 4, "uniform", seed=1)[1], idx)
    half = drawn_experts(x.half(), 64, 4, "zipf:1.2")[1]
    counts = torch.bincount(half.flatten(), minlength=64)
    assert counts[0] > 4 * counts[32:].float().mean()
    flat = torch.bincount(idx.flatten(), minlength=64)
    assert flat.max() < 3 * flat.float().mean()


def test_dummy_moe_presets_route_by_the_stated_distribution(monkeypatch):
    from flexrun.models.dummy import ROUTING_ENV, dummy_spec
    from flexrun.models.llama import LlamaModel
    monkeypatch.delenv(ROUTING_ENV, raising=False)
    spec = dummy_spec("qwen3-30b-a3b")
    assert spec.routing == "uniform" and LlamaModel(spec).moe_stats.routing == "uniform"
    assert (spec.num_experts, spec.experts_per_token, spec.expert_ffn_dim) == (128, 8, 768)
    monkeypatch.setenv(ROUTING_ENV, "zipf:1.5")
    assert dummy_spec("mixtral-8x7b").routing == "zipf:1.5"
    monkeypatch.setenv(ROUTING_ENV, "router")
    assert dummy_spec("qwen2-57b-a14b").routing == "router"
    monkeypatch.setenv(ROUTING_ENV, "skewed")
    with pytest.raises(FlexrunError, match=ROUTING_ENV):
        dummy_spec("mixtral-8x22b")
    spec = moe_spec("softmax_topk", E=16, k=4)
    spec.routing = "uniform"
    stats = MoEStats(spec.routing)
    out = moe_mlp(torch.randn(5, 32), moe_weights(spec), spec, stats)   # no router needed
    assert out.shape == (5, 32) and sum(stats.expert_tokens) == 5 * 4
    assert stats.experts_touched == sum(c > 0 for c in stats.expert_tokens)


def test_saved_routing_puts_the_busiest_experts_on_the_gpu(tmp_path):
    """MoEStats.save / load_expert_tokens round trip; with the counts, each layer's GPU
    places go to its busiest experts, and the bytes per tier stay those without them."""
    from flexrun.models.moe import load_expert_tokens
    from flexrun.plan.footprint import weight_layout
    spec = moe_spec("topk_softmax", E=8, k=2)
    spec = ModelSpec(**{**spec.__dict__, "num_layers": 2})
    stats = MoEStats("router", spec.num_layers)
    hot = [[0, 9, 1, 2, 8, 3, 4, 5], [7, 0, 0, 6, 0, 0, 0, 0]]
    for j, c in enumerate(hot):
        stats.record(torch.tensor(c), j)
    stats.save(tmp_path / "s.json", "m")
    assert load_expert_tokens(tmp_path / "s.json", spec) == hot
    pol = Policy(weights_gpu=50, weights_cpu=50, weights_disk=0)
    units = range(spec.num_units)
    _, sizes, plain = weight_layout(spec, pol, 4, units, False)
    shapes, _, tiers = weight_layout(spec, pol, 4, units, False, hot)
    tier = dict(zip(shapes, tiers))
    on_gpu = [sorted(e for e in range(8) if tier[f"layers.{j}.experts.{e}.gate.weight"] == 0)
              for j in range(2)]
    assert on_gpu == [[1, 4, 7], [0, 1, 3]]     # 3 GPU places a layer: the busiest (ties: first)
    assert plain != tiers
    for t in range(3):
        assert sum(s for s, x in zip(sizes, tiers) if x == t) == \
            sum(s for s, x in zip(sizes, plain) if x == t)
    (tmp_path / "bad.json").write_text('{"layer_tokens": [[1, 2]]}')
    with pytest.raises(FlexrunError, match="another model shape"):
        load_expert_tokens(tmp_path / "bad.json", spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_experts_match_the_per_expert_loop(dtype, monkeypatch):
    """A layer's experts back to back (as TieredStore.join lays out resident ones) run as two
    grouped GEMMs with no host sync; the per-expert loop gives the same output."""
    from flexrun.models import moe
    from flexrun.models.common import joined
    from flexrun.models.moe_grouped import grouped_mm_works
    spec = moe_spec("topk_softmax", E=6, k=2)
    w = {n: t.to(dtype) for n, t in moe_weights(spec).items()}
    gu = torch.cat([w[f"experts.{e}.{p}.weight"] for e in range(6) for p in ("gate", "up")])
    dn = torch.cat([w[f"experts.{e}.down.weight"] for e in range(6)])
    stacked = dict(w)
    f = spec.expert_ffn_dim
    for e in range(6):
        stacked[f"experts.{e}.gate.weight"] = gu[2 * e * f:(2 * e + 1) * f]
        stacked[f"experts.{e}.up.weight"] = gu[(2 * e + 1) * f:(2 * e + 2) * f]
        stacked[f"experts.{e}.down.weight"] = dn[e * spec.hidden_size:(e + 1) * spec.hidden_size]
    assert moe.stacked_experts(w, 6) is None and moe.stacked_experts(stacked, 6) is not None
    assert joined([stacked["experts.0.gate.weight"], stacked["experts.0.up.weight"]]) is not None
    x = torch.randn(11, spec.hidden_size, generator=torch.Generator().manual_seed(2)).to(dtype)
    assert grouped_mm_works(x.device, dtype)     # probed before counting the calls
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    grouped = moe_mlp(x, stacked, spec)
    assert len(calls) == 2
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grouped, moe_mlp(x, w, spec), atol=tol, rtol=tol)
    torch.testing.assert_close(grouped.float(), per_token_reference(x.float(), {
        n: t.float() for n, t in w.items()}, spec), atol=tol * 5, rtol=tol * 5)


def test_generate_writes_routing_counts_and_places_by_them(tmp_path, capsys):
    """flexrun generate --expert-stats FILE writes the run's routing counts; a later run
    with the file puts each layer's busiest experts in its GPU places, same tokens."""
    import json
    from families import save_family
    from flexrun.cli import main
    d = save_family("mixtral", tmp_path / "m")
    rows = [{"id": i, "input_ids": p} for i, p in enumerate(ragged_prompts(4, seed=3))]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = tmp_path / "routing.json"
    common = ["generate", "--model", str(d), "--device", "cpu", "--input",
              str(tmp_path / "in.jsonl"), "--max-new-tokens", "6", "--quiet",
              "--expert-stats", str(stats), "--policy", "resident"]
    assert main(common + ["--output", str(tmp_path / "a.jsonl")]) == 0
    counts = json.loads(stats.read_text())["layer_tokens"]
    assert len(counts) == 3 and sum(map(sum, counts)) > 0
    pol = tmp_path / "p.json"
    Policy(gpu_batch_size=2, num_gpu_batches=2, weights_gpu=40, weights_cpu=60,
           weights_disk=0).save(pol)
    with LLM(str(d), device="cpu", policy=str(pol), expert_stats=str(stats)) as llm:
        assert not llm.pipeline.experts.stage_all       # off-device experts are the cold ones
        for j, c in enumerate(counts):
            gpu = [e for e in range(4)
                   if llm.weights.tier_of(f"layers.{j}.experts.{e}.gate.weight") == "gpu"]
            busiest = sorted(range(4), key=lambda e: -c[e])[:len(gpu)]
            assert sorted(gpu) == sorted(busiest)
    args = common[:-2] + ["--policy", str(pol), "--output", str(tmp_path / "b.jsonl")]
    assert main(args) == 0
    a, b = ([json.loads(x)["output_ids"] for x in (tmp_path / f).read_text().splitlines()]
            for f in ("a.jsonl", "b.jsonl"))
    assert a == b
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(FlexrunError, match="not readable"):
        LLM(str(d), device="cpu", policy=str(pol), expert_stats=str(tmp_path / "bad.json"))
    with pytest.raises(FlexrunError, match="is dense"):
        LLM("dummy:opt-125m", device="cpu", expert_stats=str(stats))


@pytest.mark.parametrize("tokens", [5, 300])
def test_batched_combine_adds_in_expert_order_bit_for_bit(tokens, monkeypatch):
    """The gathered combine (k adds) and the per-expert index_add_ loop give the same sums,
    bit for bit, in fp16 where the order of additions shows."""
    from flexrun.models import moe
    g = torch.Generator().manual_seed(1)
    E, k, h = 8, 3, 16
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    groups, ys, start = [], [], 0
    for e, n in enumerate(torch.bincount(flat, minlength=E).tolist()):
        if n:
            rows = order[start:start + n] // k
            groups.append(moe.ExpertGroup(e, rows, torch.ones(n)))
            ys.append((torch.randn(n, h, generator=g) * 100).half())
            start += n
    batched = torch.zeros(tokens, h, dtype=torch.half)
    moe.add_expert_outputs(batched, groups, ys)
    monkeypatch.setattr(moe, "COMBINE_MAX_BYTES", 0)
    looped = torch.zeros(tokens, h, dtype=torch.half)
    moe.add_expert_outputs(looped, groups, ys)
    assert torch.equal(batched, looped)
    ref = torch.zeros(tokens, h, dtype=torch.half)
    for gr, y in zip(groups, ys):
        for r, row in zip(gr.rows.tolist(), y):
            ref[r] += row
    assert torch.equal(looped, ref)


