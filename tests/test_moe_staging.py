"""Expert staging on the copy lane: every off-device expert copied once per block into the
staging slots, the next unit's host experts copied ahead into the other pair, and the tokens of
the resident run either way."""
from __future__ import annotations

import pytest
import torch

from conftest import ragged_prompts
from flexrun import LLM, Policy, SamplingParams
from flexrun.plan import placement

GREEDY = SamplingParams(ignore_eos=True)


def _split_qwen3_moe_run(tmp_path, batch: int = 2, batches: int = 2, prompts: int | None = None):
    """(tokens with experts 30/70 over gpu/cpu on the copy lane, the resident run's, the trace's
    span names, the lane stats, the off-device experts) of a random Qwen3-MoE, in blocks of
    `batches` GPU batches of `batch` prompts (`prompts` of them: default a whole block)."""
    import json
    from families import save_family
    d = save_family("qwen3_moe", tmp_path / "m")
    prompts = [p for seed in (5, 6) for p in ragged_prompts(8, seed=seed)][:prompts or
                                                                            batch * batches]
    with LLM(str(d), device="cpu", policy="resident") as llm:
        ref = [o.output_ids for o in llm.generate(prompts, 6, GREEDY)]
    pol = Policy(gpu_batch_size=batch, num_gpu_batches=batches, weights_gpu=30,
                 weights_cpu=70, expert_lanes="copy")
    trace = tmp_path / "t.json"
    with LLM(str(d), device="cpu", policy=pol, trace=str(trace)) as llm:
        outs = [o.output_ids for o in llm.generate(prompts, 6, GREEDY)]
        lane, away = llm.pipeline.experts.stats, llm.pipeline.experts.remote
    spans = [e["name"] for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    return outs, ref, spans, lane, away


@pytest.mark.parametrize("stage_all", [0.0, 2.0])
def test_all_experts_staged_run_as_one_grouped_gemm(tmp_path, monkeypatch, stage_all):
    """STAGE_ALL 0: every call stages all of the unit's experts (off-device ones copied once
    per block) and runs them as one grouped GEMM with no per-expert groups; 2: never. Both
    give the resident run's tokens."""
    from flexrun.engine import experts as engine_experts
    from flexrun.models import moe
    monkeypatch.setattr(engine_experts, "GROUPED_ON_CPU", True)
    monkeypatch.setattr(placement, "HOST_RUNS_ON_CPU", True)
    monkeypatch.setattr(moe, "STAGE_ALL", stage_all)
    calls = []
    run = engine_experts.TieredExperts._run
    monkeypatch.setattr(engine_experts.TieredExperts, "_run",
                        lambda self, *a: calls.append(1) or run(self, *a))
    outs, ref, spans, lane, away = _split_qwen3_moe_run(tmp_path)
    assert outs == ref
    assert any(n.startswith("h2d experts l") for n in spans)    # host expert copies: a track
    # staging every expert, the next unit's host experts are copied ahead into the other slots
    assert any(n.endswith(" ahead") for n in spans) == (stage_all == 0.0)
    assert (calls == []) == (stage_all == 0.0) and lane.reused > 0
    if stage_all == 0.0:        # each unit copies each off-device expert once per block
        per_block = sum(len(es) for es in away.values())
        assert lane.copied % per_block == 0 and lane.copied > 0
        # and uses it again in the block's other GPU batch (copied ahead or not)
        assert lane.reused == lane.copied


def test_staging_prefetch_fills_the_other_slots_for_the_next_unit():
    """ExpertStaging: a prefetch lands in the slots the current unit does not use; the unit
    it was made for finds its experts staged there; any other unit starts empty and leaves
    the current unit's slots alone."""
    from flexrun.engine.expert_staging import ExpertStaging
    E, h, f = 4, 8, 16
    st = ExpertStaging(E, h, f, torch.device("cpu"), torch.float32)
    part = lambda v: (torch.full((f, h), v), torch.full((f, h), v + .5),  # noqa: E731
                      torch.full((h, f), v + .25))
    st.begin_unit(1)
    st.put_resident(0, *part(1.0))
    first = st.W1
    assert st.prefetch(2, {1: part(2.0), 3: part(3.0)})
    assert st.staged == {0} and st.W1 is first and float(st.W1[0, 0, 0]) == 1.0
    assert not st.prefetch(2, {1: part(2.0), 3: part(3.0)})      # already there
    st.begin_unit(2)
    assert st.staged == {1, 3} and st.W1 is not first
    assert float(st.W1[3, 0, 0]) == 3.0 and float(st.W1[3, f, 0]) == 3.5
    assert float(st.W2[1, 0, 0]) == 2.25
    st.begin_unit(5)                    # no prefetch for it: the older slots, emptied
    assert st.staged == set() and st.W1 is first
    st.prefetch(7, {2: part(7.0)})
    st.begin_unit(6)                    # a prefetch made for another unit is dropped
    assert st.staged == set()


def test_staging_keeps_a_layers_coalesced_copies_and_copies_current_values():
    """The copies of a set of host experts are worked out once per slot pair and reused the
    next time the same tensors go to the same slots; they read the tensors' values at each
    copy, and a lone expert (possibly fresh buffers of a disk read) is not kept."""
    from flexrun.engine.expert_staging import ExpertStaging
    E, h, f = 4, 8, 16
    st = ExpertStaging(E, h, f, torch.device("cpu"), torch.float32)
    host = {e: (torch.full((f, h), e + 1.0), torch.full((f, h), e + 1.5),
                torch.full((h, f), e + 1.25)) for e in (1, 2)}
    lone = lambda: {3: (torch.zeros(f, h), torch.zeros(f, h), torch.zeros(h, f))}  # noqa: E731
    st.begin_unit(1)
    for rnd in range(3):            # layer 2 goes to pair B, then A, then A again
        assert st.prefetch(2, host)
        st.begin_unit(2)
        assert st.staged == {1, 2} and float(st.W1[2, 0, 0]) == (3.0 if rnd == 0 else 7.0)
        assert float(st.W1[1, f, 0]) == 2.5 and float(st.W2[2, 0, 0]) == 3.25
        for layer in (3, 4) if rnd == 0 else (3, 4, 5):    # lone experts: copied, not kept
            st.prefetch(layer, lone())
            st.begin_unit(layer)
        assert len(st._runs) == min(rnd + 1, 2)
        host[2][0].fill_(7.0)       # the kept copies read the tensors' values at each copy


def test_calls_routed_expert_by_expert_copy_the_next_unit_ahead(tmp_path, monkeypatch):
    """A call that touches nearly every expert but runs expert by expert (a prefill too large
    for one grouped GEMM: here every call, stack() declined) also starts the next unit's host
    experts into the other staging slots; the tokens stay the resident run's."""
    from flexrun.engine import experts as engine_experts
    from flexrun.models import moe
    monkeypatch.setattr(engine_experts, "GROUPED_ON_CPU", True)
    monkeypatch.setattr(placement, "HOST_RUNS_ON_CPU", True)
    monkeypatch.setattr(moe, "STAGE_ALL", 0.0)
    monkeypatch.setattr(engine_experts.TieredExperts, "stack", lambda self, w, rows: None)
    outs, ref, spans, _, _ = _split_qwen3_moe_run(tmp_path)
    assert outs == ref
    assert any(n.endswith(" ahead") for n in spans)


@pytest.mark.parametrize("batches,prompts,staged", [(1, 1, False), (10, 10, True),
                                                    (10, 8, False)])
def test_a_block_of_small_batches_that_touches_all_experts_stages_them_all(
        tmp_path, monkeypatch, batches, prompts, staged):
    """Decode calls of 1 row touch 2 of the random Qwen3-MoE's 8 experts; a block of 10 such
    GPU batches is expected to touch nearly all (STAGE_ALL: 94%): a staged expert serves the whole
    block, so each unit's first call stages all of them and every call runs one grouped GEMM
    (no call routed expert by expert); a block of one batch keeps the per-expert route, and so
    does a last block of 8 batches (8 rows touch 89.99%: the batches it holds count, not the
    policy's). The tokens stay the resident run's."""
    from flexrun.engine import experts as engine_experts
    monkeypatch.setattr(engine_experts, "GROUPED_ON_CPU", True)
    monkeypatch.setattr(placement, "HOST_RUNS_ON_CPU", True)
    rows = []
    run = engine_experts.TieredExperts._run
    monkeypatch.setattr(engine_experts.TieredExperts, "_run",
                        lambda self, x2, *a: rows.append(x2.shape[0]) or run(self, x2, *a))
    outs, ref, _, lane, away = _split_qwen3_moe_run(tmp_path, 1, batches, prompts)
    assert outs == ref
    decode_calls = [r for r in rows if r == 1]
    assert (decode_calls == []) == staged and (rows == []) == staged, rows
    if staged:      # each off-device expert copied once per block and unit
        assert lane.copied % sum(len(es) for es in away.values()) == 0


def test_next_units_copies_queue_when_a_unit_starts_whose_experts_came_ahead(tmp_path,
                                                                            monkeypatch):
    """Staging every expert: once a unit's host experts were copied ahead, the next unit's
    copies are queued when the unit starts (copy_ahead), before its attention, not at its
    first MoE call; the first MoE unit of a step (nothing copied ahead) queues them from its
    first call. The tokens stay the resident run's."""
    import sys
    from flexrun.engine import experts as engine_experts
    from flexrun.models import moe
    monkeypatch.setattr(engine_experts, "GROUPED_ON_CPU", True)
    monkeypatch.setattr(placement, "HOST_RUNS_ON_CPU", True)
    monkeypatch.setattr(moe, "STAGE_ALL", 0.0)
    callers = []
    nxt = engine_experts.TieredExperts._prefetch_next

    def spy(self):
        callers.append(sys._getframe(1).f_code.co_name)
        return nxt(self)
    monkeypatch.setattr(engine_experts.TieredExperts, "_prefetch_next", spy)
    outs, ref, spans, _, _ = _split_qwen3_moe_run(tmp_path)
    assert outs == ref
    assert "copy_ahead" in callers and "stack" in callers
    assert sum(n.endswith(" ahead") for n in spans) > 0


def test_the_last_moe_unit_copies_the_first_ahead_while_a_step_follows(tmp_path, monkeypatch):
    """Staging every expert: in decode the block's last MoE unit starts the first one's host
    experts into the other slots for the next step, in every step but the block's last (a
    step may end the run there), so the first MoE unit of a decode step finds them staged;
    not from the prefill (it may stage every expert where decode routes expert by expert).
    The tokens stay the resident run's."""
    from flexrun.engine import experts as engine_experts
    from flexrun.models import moe
    monkeypatch.setattr(engine_experts, "GROUPED_ON_CPU", True)
    monkeypatch.setattr(placement, "HOST_RUNS_ON_CPU", True)
    monkeypatch.setattr(moe, "STAGE_ALL", 0.0)
    outs, ref, spans, _, away = _split_qwen3_moe_run(tmp_path)
    assert outs == ref
    first, last = min(away), max(away)
    assert first < last
    copies = [n.split()[2] for n in spans if n.startswith("h2d experts l")]
    wraps = [i for i, n in enumerate(spans) if n.startswith(f"h2d experts l{first} x")
             and n.endswith(" ahead")]
    # 6 new tokens: the prefill (step 0) and decode steps 1-5, of which 1-4 have a next step
    assert len(wraps) == 4, copies
    assert copies[-1] != f"l{first}"         # nothing copied past the block's last step


@pytest.mark.parametrize("lanes", ["copy", "cpu"])
def test_decode_attends_every_batch_before_the_moe_of_a_split_layer(tmp_path, monkeypatch,
                                                                    lanes):
    """Decode of a MoE layer with experts off the device: the attention of every GPU batch of
    the block runs before any batch's MoE (so CPU attention does not wait behind the layer's
    expert copies); the prefill keeps one batch at a time. The tokens stay the resident
    run's, on either lane. The next unit's expert copies queue after the attention (an H2D
    copy of an attention output queued behind them would wait for them)."""
    from families import save_family
    from flexrun.engine import experts as engine_experts
    from flexrun.engine import pipeline as engine_pipeline
    monkeypatch.setattr(engine_pipeline, "ATTEND_FIRST_ON_CPU", True)
    calls = []
    attention, post = engine_pipeline.Pipeline._attention, engine_pipeline.Pipeline._post_attn
    ahead = engine_experts.TieredExperts.copy_ahead

    def spy_ahead(self):
        calls.append(("ahead", None, None, None))
        return ahead(self)
    monkeypatch.setattr(engine_experts.TieredExperts, "copy_ahead", spy_ahead)

    def spy_attention(self, w, layer, b, prefill, **kw):
        calls.append(("attn", layer, b.batch_no, prefill))
        return attention(self, w, layer, b, prefill, **kw)

    def spy_post(self, w, layer, h, attn):
        calls.append(("mlp", layer, None, None))
        return post(self, w, layer, h, attn)
    monkeypatch.setattr(engine_pipeline.Pipeline, "_attention", spy_attention)
    monkeypatch.setattr(engine_pipeline.Pipeline, "_post_attn", spy_post)
    d = save_family("qwen3_moe", tmp_path / "m")
    prompts = ragged_prompts(6, seed=2)
    with LLM(str(d), device="cpu", policy="resident") as llm:
        ref = [o.output_ids for o in llm.generate(prompts, 5, GREEDY)]
    calls.clear()
    pol = Policy(gpu_batch_size=2, num_gpu_batches=3, weights_gpu=30, weights_cpu=70,
                 expert_lanes=lanes)
    with LLM(str(d), device="cpu", policy=pol) as llm:
        assert [o.output_ids for o in llm.generate(prompts, 5, GREEDY)] == ref
    kinds = "".join({"attn": "a", "mlp": "m", "ahead": "c"}[c[0]] for c in calls)
    assert "camamam" in kinds           # prefill: one batch at a time
    assert "aaacmmm" in kinds           # decode: the block's attention, its copies, its MoE


def test_host_experts_laid_out_as_the_slots_cross_in_one_copy_per_run():
    """A layer's host experts are placed back to back as the staging slots hold them (gate
    and up of each in expert order, then the downs: placement.host_expert_runs,
    TieredStore.reserve_host), so a run of experts with consecutive ids is one copy into W1
    and one into W2; a gap in the ids (an expert on the device) starts a new run; the slots
    get exactly the experts' values."""
    from flexrun.engine.expert_staging import ExpertStaging, coalesce
    from flexrun.memory.storage import TieredStore
    from flexrun.plan.placement import host_expert_runs
    E, h, f = 6, 8, 4
    name = lambda e, p: f"layers.0.experts.{e}.{p}.weight"    # noqa: E731
    host = [0, 1, 2, 4, 5]                  # expert 3 on the device
    tier_of = {name(e, p): "cpu" if e in host else "gpu" for e in range(E)
               for p in ("gate", "up", "down")}
    shapes = {n: ((h, f) if ".down." in n else (f, h)) for n in tier_of}
    fake = type("S", (), {"num_layers": 1, "num_experts": E, "is_moe": lambda s, j: True})()
    (run,) = host_expert_runs(fake, range(1, 2), shapes, tier_of)
    assert run[:4] == [name(0, "gate"), name(0, "up"), name(1, "gate"), name(1, "up")]
    assert run[-5:] == [name(e, "down") for e in host]
    store = TieredStore(torch.device("cpu"), None, pin=False)
    store.reserve_host(run, [shapes[n] for n in run], torch.float32)
    vals = {n: torch.randn(shapes[n]) for n in run}
    for n in reversed(run):                 # any put order: each lands in its place
        store.put(n, vals[n], "cpu")
    store.drop_reserved()
    parts = {e: tuple(store.homes[name(e, p)][1] for p in ("gate", "up", "down"))
             for e in host}
    staging = ExpertStaging(E, h, f, torch.device("cpu"), torch.float32)
    b = staging._cur
    staging._slots(b)
    w1, w2 = b.W1.view(-1), b.W2.view(-1)
    pieces = [p for e in host for p in ((w1, e * 2 * f * h, parts[e][0]),
                                        (w1, e * 2 * f * h + f * h, parts[e][1]))]
    pieces += [(w2, e * f * h, parts[e][2]) for e in host]
    runs = coalesce(pieces)
    assert [(r[0] is w1, r[1], r[2].numel()) for r in runs] == [
        (True, 0, 3 * 2 * f * h), (True, 4 * 2 * f * h, 2 * 2 * f * h),
        (False, 0, 3 * f * h), (False, 4 * f * h, 2 * f * h)]
    staging.put_host_many([(e, *parts[e]) for e in host])
    for e in host:
        assert torch.equal(b.W1[e, :f], vals[name(e, "gate")])
        assert torch.equal(b.W1[e, f:], vals[name(e, "up")])
        assert torch.equal(b.W2[e], vals[name(e, "down")])
    assert staging.staged == set(host)


def test_reserved_places_come_in_segments(monkeypatch):
    """reserve_host cuts its places into buffers of at most RESERVE_SEGMENT bytes (a failed
    cudaHostRegister falls back to pin_memory, which rounds a buffer up to a power of two):
    each tensor in one buffer, a run breaking only at a buffer's edge, all kept."""
    from flexrun.memory import storage
    monkeypatch.setattr(storage, "RESERVE_SEGMENT", 100 * 4)
    store = storage.TieredStore(torch.device("cpu"), None, pin=False)
    names = [f"t{i}" for i in range(5)]
    store.reserve_host(names, [(40,)] * 5, torch.float32)     # 160 bytes each: 2 a buffer
    assert [b.numel() for b in store._host_bufs] == [80, 80, 40]
    for n in names:
        store.put(n, torch.full((40,), float(n[1])), "cpu")
    got = [store.homes[n][1] for n in names]
    assert [int(t[0]) for t in got] == list(range(5))
    assert got[1].data_ptr() == got[0].data_ptr() + 160 and \
        got[2].untyped_storage().data_ptr() != got[0].untyped_storage().data_ptr()


@pytest.mark.parametrize("family,compress", [("qwen3_moe", False), ("mixtral", False),
                                             ("mixtral", True)])
def test_unstaged_experts_of_the_next_unit_are_copied_ahead(tmp_path, monkeypatch, family,
                                                            compress):
    """The per-expert route (no staging slots: a CPU run here, 4-bit or biased experts on a
    GPU): once a unit's calls copied all of its host experts, the next MoE unit's are copied
    ahead as it starts and held for that unit's block ("ahead" spans), which then copies none
    of its own. The tokens are those of the run without copies ahead (the resident run's,
    uncompressed)."""
    import json
    from families import save_family
    from flexrun.engine import expert_copies
    d = save_family(family, tmp_path / "m")
    prompts = [p for seed in (5, 6) for p in ragged_prompts(8, seed=seed)][:8]
    pol = Policy(gpu_batch_size=4, num_gpu_batches=2, weights_gpu=30, weights_cpu=70,
                 expert_lanes="copy", compress_weight=compress)

    def run(ahead: bool, policy=pol):
        monkeypatch.setattr(expert_copies, "HELD_AHEAD_ON_CPU", ahead)
        trace = tmp_path / f"t{ahead}.json"
        with LLM(str(d), device="cpu", policy=policy, trace=str(trace)) as llm:
            outs = [o.output_ids for o in llm.generate(prompts, 5, GREEDY)]
            lane = llm.pipeline.experts.stats
        spans = [e["name"] for e in json.loads(trace.read_text())["traceEvents"]
                 if e["ph"] == "X" and e["name"].startswith("h2d experts")]
        return outs, spans, lane
    outs, spans, lane = run(True)
    plain, plain_spans, plain_lane = run(False, "resident" if not compress else pol)
    assert outs == plain
    assert not any(n.endswith(" ahead") for n in plain_spans)
    ahead = [n for n in spans if n.endswith(" ahead")]
    assert ahead, spans
    # a unit whose experts came ahead copies none in its calls: each layer's spans of a
    # step are one "ahead" span or the unit's own copies, not both
    assert len(spans) < 2 * len(ahead) + 2 * len({n.split()[2] for n in spans})
    if compress:
        assert lane.copied == plain_lane.copied


@pytest.mark.parametrize("compress", [False, True])
def test_fetched_rows_lie_in_one_buffer_and_multiply_as_one(compress):
    """TieredStore.fetch_rows (a held expert's gate and up on the per-expert route): the values
    land as consecutive row blocks of one buffer per part, equal to the host ones, so
    linear_rows multiplies them as one matrix with the separate products' values; values
    whose parts do not stack are refused."""
    from flexrun.memory.quant import compress as quantize
    from flexrun.memory.storage import TieredStore
    from flexrun.models.common import joined, linear, linear_rows
    torch.manual_seed(0)
    hosts = [torch.randn(6, 64), torch.randn(10, 64)]
    if compress:
        hosts = [quantize(h, 4, 32, -1) for h in hosts]
    store = TieredStore(torch.device("cpu"), None, pin=False)
    got = store.fetch_rows(hosts)
    assert joined(got) is not None and joined(hosts) is None
    x = torch.randn(3, 64)
    ys = linear_rows(x, got, [None, None])
    for y, h in zip(ys, hosts):
        assert torch.equal(y, linear(x, h))
    assert store.fetch_rows([torch.randn(4, 64), torch.randn(4, 32)]) is None
