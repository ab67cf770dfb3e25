"""The static decode step that CUDA graphs capture (engine/graphs.py), run eagerly on the CPU.

It writes K/V at a cache index held in a tensor and attends over whole KV slots with a mask,
so it must give the plain run's greedy tokens for ragged prompts, several GPU batches, blocks
of different lengths reusing slots, and placements mixing resident and offloaded units."""
import pytest
import torch

from conftest import hf_greedy, ragged_prompts, tiny_llama
from flexrun import LLM, Policy, SamplingParams
from flexrun.engine import graphs
from flexrun.engine.attention import attend, attend_slot

GREEDY = SamplingParams(ignore_eos=True)
NEW = 8


@pytest.fixture
def static_on_cpu(monkeypatch):
    monkeypatch.setattr(graphs, "STATIC_ON_CPU", True)


def _run(d, prompts, policy=None, tmp=None, new=NEW):
    with LLM(str(d), device="cpu", policy=policy, offload_dir=tmp) as llm:
        out = [o.output_ids for o in llm.generate(prompts, new, GREEDY)]
        return out, llm.pipeline.graphs


@pytest.mark.parametrize("model", ["opt", "opt350", "llama"])
def test_static_step_matches_plain_and_hf(model, opt_dir, opt350_dir, llama_dir, monkeypatch):
    d = {"opt": opt_dir, "opt350": opt350_dir, "llama": llama_dir}[model]
    prompts = ragged_prompts(7)
    pol = Policy(gpu_batch_size=3, num_gpu_batches=2)
    plain, g = _run(d, prompts, pol)
    assert g is None
    monkeypatch.setattr(graphs, "STATIC_ON_CPU", True)
    static, g = _run(d, prompts, pol)
    assert g is not None and g.runs > 0 and g.captures == 0   # ran, eagerly
    assert static == plain
    assert static == hf_greedy(d, prompts, NEW)


def test_static_step_across_blocks_and_placements(llama_dir, tmp_path, static_on_cpu):
    long_first = ragged_prompts(8)
    ref, _ = _run(llama_dir, long_first)
    # blocks of 2 prompts: later blocks are shorter than the first, so they reuse larger
    # slots whose tail holds an earlier block's keys (masked out)
    got, g = _run(llama_dir, long_first, Policy(gpu_batch_size=2, num_gpu_batches=1))
    assert got == ref and g.block > 1
    # half the weights and a third of the cache elsewhere: resident and offloaded units mix
    pol = Policy(gpu_batch_size=4, num_gpu_batches=2, weights_gpu=50, weights_cpu=25,
                 weights_disk=25, cache_gpu=40, cache_cpu=30, cache_disk=30)
    got, _ = _run(llama_dir, long_first, pol, str(tmp_path))
    assert got == ref
    assert list(tmp_path.iterdir()) == []


def test_cuda_graphs_off_runs_plain(opt_dir, static_on_cpu):
    _, g = _run(opt_dir, ragged_prompts(3), Policy(cuda_graphs=False))
    assert g is None


def test_attend_slot_ignores_masked_keys():
    """Keys past the mask, however large, change nothing; GQA heads fold onto their KV head."""
    torch.manual_seed(0)
    b, nh, kvh, T, hd, used = 3, 8, 2, 12, 16, 7
    q = torch.randn(b, nh, 1, hd)
    K, V = torch.randn(b, kvh, T, hd), torch.randn(b, kvh, T, hd)
    mask = torch.zeros(b, 1, 1, T, dtype=torch.bool)
    mask[..., :used] = True
    mask[1, ..., :2] = False                        # a left-padded row
    ref = attend(q, K[:, :, :used].repeat_interleave(nh // kvh, 1),
                 V[:, :, :used].repeat_interleave(nh // kvh, 1), mask[..., :used])
    K[:, :, used:] = 1e4
    V[:, :, used:] = -1e4
    got = attend_slot(q, K, V, mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    V[:, :, 0] = 99.0                               # a used key must matter
    assert not torch.allclose(attend_slot(q, K, V, mask), ref)


def test_key_range_matches_decode_mask():
    """The eager GPU decode step's key ranges for the split-K kernel (Pipeline._key_range)
    select exactly the keys decode_mask lets through: left padding out, every later key in."""
    from types import SimpleNamespace

    from flexrun.engine.attention import decode_mask
    from flexrun.engine.batch_state import BatchState
    from flexrun.engine.pipeline import Pipeline
    P, gen, t = 6, 4, 8
    valid = torch.zeros(3, P + gen, dtype=torch.bool)
    for row, pad in enumerate((0, 2, 5)):
        valid[row, pad:t + 1] = True
    b = BatchState(indices=[0, 1, 2], ids=torch.zeros(3, P, dtype=torch.long), valid=valid,
                   prompt_len=P, next_pos=torch.zeros(3, dtype=torch.long), time=t)
    pipe = SimpleNamespace(device=torch.device("cpu"), _per_step=Pipeline._per_step)
    start, last = Pipeline._key_range(pipe, b)
    assert start.tolist() == [0, 2, 5] and last.tolist() == [t]
    pos = torch.arange(P + gen)
    got = ((pos >= start[:, None]) & (pos <= last))[:, None, None, :t + 1]
    assert torch.equal(got, decode_mask(valid[:, :t + 1]))
    assert Pipeline._key_range(pipe, b)[0] is start             # made once per step


def test_whole_unit_layout_keeps_units_resident_within_budget():
    """On a GPU with its KV cache there, streamed weights are whole units spaced evenly, the
    resident bytes never above the policy's share (the rest in whole tensors)."""
    from flexrun.plan.footprint import footprint, unit_set_shapes, weight_bytes, weight_tiers
    from flexrun.models.dummy import dummy_spec
    spec = dummy_spec("opt-6.7b")
    pol = Policy(gpu_batch_size=8, weights_gpu=88, weights_cpu=8, weights_disk=4)
    shapes = unit_set_shapes(spec, None)
    names = list(shapes)
    sizes = [weight_bytes(n, shapes[n], 2, pol) for n in names]
    units = range(spec.num_units)
    tiers = weight_tiers(spec, pol, names, sizes, units, cuda=True)
    total = sum(sizes)
    on = [sum(s for s, t in zip(sizes, tiers) if t == x) / total for x in range(3)]
    assert 0.88 - max(sizes) / total <= on[0] <= 0.88 + max(sizes) / total
    assert abs(on[2] / (on[1] + on[2]) - 1 / 3) < 0.1
    tier_of = dict(zip(names, tiers))
    streamed = [u for u in units if any(tier_of[n] for n in spec.unit_shapes(u))]
    assert 3 <= len(streamed) <= 5                       # 12% of 32 layers: ~4
    assert min(b - a for a, b in zip(streamed, streamed[1:])) >= 6     # spread out
    # off the GPU, or with the cache off the device, every unit keeps its share
    for cuda, p in ((False, pol), (True, Policy(**{**pol.to_dict(), "cache_gpu": 50,
                                                   "cache_cpu": 50}))):
        t = weight_tiers(spec, p, names, sizes, units, cuda)
        tier_of = dict(zip(names, t))
        assert sum(any(tier_of[n] for n in spec.unit_shapes(u)) for u in units) > 20
    # the GPU share is a cap, also for the tensors left over (a big lm_head must not land
    # on the GPU past it); no cpu/disk share at all leaves the plain layout
    s8 = dummy_spec("llama3-8b")
    sh8 = unit_set_shapes(s8, None)
    n8 = list(sh8)
    z8 = [weight_bytes(n, sh8[n], 2, pol) for n in n8]
    for gpu in (99, 95, 60):
        p8 = Policy(gpu_batch_size=8, weights_gpu=gpu, weights_cpu=100 - gpu)
        t8 = weight_tiers(s8, p8, n8, z8, range(s8.num_units), cuda=True)
        assert sum(z for z, t in zip(z8, t8) if t == 0) <= gpu / 100 * sum(z8)
    almost = Policy(gpu_batch_size=8, weights_gpu=100 - 5e-7, weights_cpu=0, weights_disk=0)
    assert weight_tiers(s8, almost, n8, z8, range(s8.num_units), cuda=True) == [0] * len(n8)
    # a pipeline stage, or offloaded activations: every unit keeps its share
    stage = range(5, 20)
    names_s = list(unit_set_shapes(spec, stage))
    sizes_s = [weight_bytes(n, shapes[n], 2, pol) for n in names_s]
    t = dict(zip(names_s, weight_tiers(spec, pol, names_s, sizes_s, stage, cuda=True)))
    assert all(any(t[n] for n in spec.unit_shapes(u)) for u in range(6, 19))
    acts = Policy(**{**pol.to_dict(), "act_gpu": 50, "act_cpu": 50})
    t = dict(zip(names, weight_tiers(spec, acts, names, sizes, units, cuda=True)))
    assert all(any(t[n] for n in spec.unit_shapes(u)) for u in range(1, 33))
    # the footprint counts two whole streamed units of device buffers
    whole, spread = (footprint(spec, pol, 2, 512, 32, None, c) for c in (True, False))
    assert whole.buffers > spread.buffers


@pytest.fixture(scope="module")
def llama8_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama8"), layers=8)


@pytest.mark.parametrize("cpu_part", [(30, 0), (20, 25)])
def test_whole_unit_layout_matches_plain(cpu_part, llama8_dir, tmp_path, static_on_cpu,
                                         monkeypatch):
    """Resident units run the static step, streamed ones (from RAM or disk) the plain one,
    their loads started a streamed unit ahead: the same greedy tokens as all resident."""
    from flexrun.plan import footprint
    llama_dir, prompts = llama8_dir, ragged_prompts(6)
    ref, _ = _run(llama_dir, prompts, Policy(gpu_batch_size=3, num_gpu_batches=2,
                                             cuda_graphs=False))
    monkeypatch.setattr(footprint, "streams_whole_units", lambda *a: True)
    c, d = cpu_part
    pol = Policy(gpu_batch_size=3, num_gpu_batches=2, weights_gpu=100 - c - d,
                 weights_cpu=c, weights_disk=d)
    got, g = _run(llama_dir, prompts, pol, tmp_path)
    assert got == ref
    with LLM(str(llama_dir), device="cpu", policy=pol, offload_dir=tmp_path) as llm:
        tiers = llm.pipeline.unit_tiers
        assert {"gpu"} in tiers.values() and sum(t != {"gpu"} for t in tiers.values()) >= 3
        out = llm.generate(prompts, NEW, GREEDY)
        assert [o.output_ids for o in out] == ref and llm.pipeline.graphs.runs > 0
