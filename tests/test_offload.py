"""Every placement path gives the resident run's greedy tokens; offload files never linger."""
import itertools

import pytest

from conftest import ragged_prompts
from flexrun import LLM, Policy, SamplingParams
from flexrun.memory.storage import assign_tiers, split_report

PLACES = {"gpu": (100, 0, 0), "cpu": (0, 100, 0), "disk": (0, 0, 100), "split": (30, 40, 30)}
BATCHES = [(1, 1), (2, 3), (4, 2)]
NEW = 8
GREEDY = SamplingParams(ignore_eos=True)


def _policy(w, c, a, i: int) -> Policy:
    bs, nb = BATCHES[i % 3]
    return Policy(gpu_batch_size=bs, num_gpu_batches=nb,
                  weights_gpu=w[0], weights_cpu=w[1], weights_disk=w[2],
                  cache_gpu=c[0], cache_cpu=c[1], cache_disk=c[2],
                  act_gpu=a[0], act_cpu=a[1], act_disk=a[2],
                  overlap=(i // 3) % 2 == 0, cpu_attention=(i // 6) % 2 == 0)


@pytest.fixture(scope="module", params=["opt", "llama"])
def model_and_ref(request, opt_dir, llama_dir):
    d = {"opt": opt_dir, "llama": llama_dir}[request.param]
    prompts = ragged_prompts(7)
    with LLM(str(d), device="cpu", policy="resident") as llm:
        ref = [o.output_ids for o in llm.generate(prompts, NEW, GREEDY)]
    return d, prompts, ref


COMBOS = list(itertools.product(PLACES, PLACES, PLACES))


@pytest.mark.parametrize("i,combo", list(enumerate(COMBOS)), ids=["-".join(c) for c in COMBOS])
def test_placement_matches_resident(model_and_ref, tmp_path, i, combo):
    d, prompts, ref = model_and_ref
    pol = _policy(*(PLACES[x] for x in combo), i)
    with LLM(str(d), device="cpu", policy=pol, offload_dir=str(tmp_path)) as llm:
        outs = llm.generate(prompts, NEW, GREEDY)
    assert [o.output_ids for o in outs] == ref, pol
    assert list(tmp_path.iterdir()) == []


def test_offload_dir_emptied_after_exception(llama_dir, tmp_path):
    pol = Policy(weights_gpu=0, weights_disk=100, cache_gpu=0, cache_disk=100, gpu_batch_size=2)
    llm = LLM(str(llama_dir), device="cpu", policy=pol, offload_dir=str(tmp_path))
    assert any(tmp_path.iterdir())
    calls = {"n": 0}
    orig = llm.pipeline._unit

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("injected failure")
        return orig(*a, **k)
    llm.pipeline._unit = boom
    with pytest.raises(RuntimeError, match="injected") as err:
        with llm:
            llm.generate(ragged_prompts(4), NEW, GREEDY)
    assert list(tmp_path.iterdir()) == []
    # while the exception (and its traceback) lives on, no offload file stays mapped: its
    # disk space would stay held after close() unlinked it
    assert err.value is not None
    with open("/proc/self/maps") as f:
        assert not [line for line in f if str(tmp_path) in line]


def test_assign_tiers_follows_percentages():
    sizes = [10, 100, 100, 30] * 25
    tiers = assign_tiers(sizes, (20, 50, 30))
    rep = split_report(sizes, tiers)
    assert abs(rep["gpu"] - 20) <= 100 / sum(sizes) * 100
    assert abs(rep["cpu"] - 50) <= 100 / sum(sizes) * 100
    assert tiers.count(0) > 0 and assign_tiers(sizes, (0, 100, 0)) == [1] * len(sizes)


@pytest.mark.parametrize("mapped", [True, False])
def test_cpu_disk_weights_mapped_or_read(model_and_ref, tmp_path, monkeypatch, mapped):
    """A CPU run computes on its disk weights through mappings of the page cache (or, with
    FLEXRUN_MAP_DISK=0, reads them into reused buffers): the resident run's tokens either way,
    every decode step attends over whole slots, and no mapping of an offload file outlives
    the run."""
    import flexrun.engine.pipeline as pipeline_mod
    from flexrun.memory import disk
    d, prompts, ref = model_and_ref
    monkeypatch.setattr(pipeline_mod, "MAP_DISK", mapped)
    calls = {"map": 0, "whole": 0}
    real_map, real_range = disk.DiskTier.map_read, pipeline_mod.attend_range

    def spy_map(self, ref_):
        calls["map"] += 1
        return real_map(self, ref_)

    def spy_range(*a):
        calls["whole"] += 1
        return real_range(*a)
    monkeypatch.setattr(disk.DiskTier, "map_read", spy_map)
    monkeypatch.setattr(pipeline_mod, "attend_range", spy_range)
    pol = Policy(gpu_batch_size=4, num_gpu_batches=2, weights_gpu=0, weights_disk=100)
    with LLM(str(d), device="cpu", policy=pol, offload_dir=str(tmp_path)) as llm:
        outs = llm.generate(prompts, NEW, GREEDY)
        assert [o.output_ids for o in outs] == ref
        assert (calls["map"] > 0) == mapped
        assert calls["whole"] > 0
        with open("/proc/self/maps") as f:
            assert not [line for line in f if str(tmp_path) in line]
    assert list(tmp_path.iterdir()) == []


def test_cpu_slots_fit_each_block(opt_dir):
    """A CPU run's decode attention reads whole KV slots, so a later, shorter block gets slots
    of its own length rather than reusing the first block's long ones; tokens are those of
    each prompt run alone."""
    lens = (40, 38, 6, 5, 4, 3)
    prompts = [list(range(5 + i, 5 + i + n)) for i, n in enumerate(lens)]
    with LLM(str(opt_dir), device="cpu", policy=Policy(gpu_batch_size=2)) as llm:
        alone = [llm.generate([p], 3, GREEDY)[0].output_ids for p in prompts]
        got = [o.output_ids for o in llm.generate(prompts, 3, GREEDY)]
        longest_last_block = max(s.max_len for s in llm.pipeline.kv.slots.values())
    assert got == alone
    assert longest_last_block <= 4 + 3 + 16 < 40


@pytest.mark.parametrize("cache", ["cpu", "disk", "split"])
def test_some_batches_keep_their_cache_on_the_device(model_and_ref, tmp_path, cache):
    """gpu_cache_batches: the block's first GPU batches keep their KV slots on the compute
    device in every layer, the others follow the cache split (attended on the host); the
    tokens are the resident run's, the footprint counts that share on the device and the cost
    model prices it as device attention."""
    from flexrun.plan.costmodel import predict
    from flexrun.plan.footprint import footprint
    from flexrun.plan.hardware import HardwareProfile, PROFILES_DIR
    from flexrun.models.dummy import dummy_spec
    d, prompts, ref = model_and_ref
    pol = Policy(gpu_batch_size=2, num_gpu_batches=3, cache_gpu=0, cache_cpu=PLACES[cache][1],
                 cache_disk=PLACES[cache][2] + PLACES[cache][0], cpu_attention=True,
                 gpu_cache_batches=1)
    with LLM(str(d), device="cpu", policy=pol, offload_dir=str(tmp_path)) as llm:
        outs = llm.generate(prompts, NEW, GREEDY)
        tiers = {(j, b): s.tier for (j, b), s in llm.pipeline.kv.slots.items()}
    assert [o.output_ids for o in outs] == ref
    assert {t for (j, b), t in tiers.items() if b == 0} == {"gpu"}
    assert "gpu" not in {t for (j, b), t in tiers.items() if b > 0}
    with pytest.raises(Exception, match="gpu_cache_batches"):
        Policy(num_gpu_batches=2, gpu_cache_batches=3)
    spec = dummy_spec("opt-30b")
    off = Policy(gpu_batch_size=32, num_gpu_batches=2, weights_gpu=20, weights_cpu=80,
                 cache_gpu=0, cache_cpu=100, cpu_attention=True)
    half = Policy(**{**off.to_dict(), "gpu_cache_batches": 1})
    a, b = (footprint(spec, x, 2, 512, 32, cuda=True) for x in (off, half))
    assert a.cache["gpu"] == 0 and b.cache["gpu"] == pytest.approx(a.cache["cpu"] / 2)
    assert sum(b.cache.values()) == pytest.approx(sum(a.cache.values()))
    prof = HardwareProfile.load(PROFILES_DIR / "h200.json")
    pa, pb = (predict(spec, x, prof, 512, 32, device="cuda") for x in (off, half))
    assert pb.decode_s < pa.decode_s        # half the KV read at HBM rate instead of DRAM


@pytest.mark.parametrize("mapped,ahead", [(True, 1), (True, 2), (True, 3), (False, 2)])
def test_streamed_units_load_weights_ahead(model_and_ref, tmp_path, monkeypatch, mapped, ahead):
    """Policy.weights_ahead streamed units load ahead of the unit computing, across steps
    too, never one twice at a time; a CPU run reading disk weights into its two buffers
    (FLEXRUN_MAP_DISK=0) keeps one ahead. The resident run's tokens every way."""
    import flexrun.engine.pipeline as pipeline_mod
    from flexrun.engine.unit_loads import UnitLoads
    d, prompts, ref = model_and_ref
    monkeypatch.setattr(pipeline_mod, "MAP_DISK", mapped)
    held = []
    start_next = UnitLoads._start_next

    def spy(self, task, loads, gen_len):
        start_next(self, task, loads, gen_len)
        held.append(sorted(loads))
    monkeypatch.setattr(UnitLoads, "_start_next", spy)
    pol = Policy(gpu_batch_size=4, num_gpu_batches=2, weights_gpu=40, weights_cpu=30,
                 weights_disk=30, weights_ahead=ahead)
    with LLM(str(d), device="cpu", policy=pol, offload_dir=str(tmp_path)) as llm:
        assert [o.output_ids for o in llm.generate(prompts, NEW, GREEDY)] == ref
        streamed = len(llm.pipeline.streamed)
    want = min(ahead if mapped else 1, streamed)
    assert streamed >= 3 and max(len(h) for h in held) == want
    assert list(tmp_path.iterdir()) == []


def test_weights_ahead_is_checked_and_counted():
    """weights_ahead must be 1..3; on a GPU the footprint holds one streamed unit more per
    unit ahead (on a CPU run loads map the page cache or use the two read buffers)."""
    from flexrun.config import FlexrunError
    from flexrun.models.dummy import dummy_spec
    from flexrun.plan.footprint import footprint
    for bad in (0, 4, 1.5, True):
        with pytest.raises(FlexrunError, match="weights_ahead"):
            Policy(weights_ahead=bad)
    spec = dummy_spec("opt-1.3b")
    pols = [Policy(weights_gpu=50, weights_cpu=50, weights_ahead=a) for a in (1, 2, 3)]
    gpu = [footprint(spec, p, 2, 128, 32, cuda=True).buffers for p in pols]
    cpu = [footprint(spec, p, 4, 128, 32).buffers for p in pols]
    # the largest streamed unit (about half of the 50272 x 2048 fp16 embedding) per unit ahead
    assert gpu[1] - gpu[0] == gpu[2] - gpu[1] > 0.45 * 50272 * 2048 * 2
    assert cpu[0] == cpu[1] == cpu[2]
    assert Policy.from_dict(pols[1].to_dict()).weights_ahead == 2
