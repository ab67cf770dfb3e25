"""bf16 CPU runs store linear weights pre-packed for oneDNN: the same bits as F.linear, and
the same greedy tokens as plain weights on every tier (mapped from disk included)."""
import pytest
import torch

from conftest import hf_greedy, ragged_prompts
from flexrun import LLM, Policy, SamplingParams
from flexrun.memory import packed as packed_weights
from flexrun.memory import disk
from flexrun.memory.packed import Packed

pytestmark = pytest.mark.skipif(not packed_weights.available(),
                                reason="oneDNN bf16 packing is not available on this CPU")
GREEDY = SamplingParams(ignore_eos=True)
NEW = 8


@pytest.mark.parametrize("shape", [(64, 64), (160, 64), (64, 160), (320, 64), (1024, 512)])
def test_packed_linear_gives_plain_bits(shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g).bfloat16()
    b = torch.randn(shape[0], generator=g).bfloat16()
    p = packed_weights.pack(w, 16)
    assert p.shape == shape and p.data.dtype == torch.uint8
    assert torch.equal(p.dense(), w)
    for rows in (1, 3, 16, 40):
        x = torch.randn(rows, shape[1], generator=g).bfloat16()
        assert torch.equal(p.linear(x, b), torch.nn.functional.linear(x, w, b))
    x = torch.randn(2, 7, shape[1], generator=g).bfloat16()
    assert torch.equal(p.linear(x), torch.nn.functional.linear(x, w))


def test_packing_only_for_bf16_cpu_runs():
    cpu = torch.device("cpu")
    assert packed_weights.applies(cpu, torch.bfloat16, compress_weight=False)
    assert not packed_weights.applies(cpu, torch.float32, compress_weight=False)
    assert not packed_weights.applies(cpu, torch.bfloat16, compress_weight=True)
    assert not packed_weights.applies(torch.device("cuda"), torch.bfloat16, False)


@pytest.fixture(scope="module", params=["opt", "llama"])
def bf16_ref(request, opt_dir, llama_dir):
    """The resident bf16 run with plain weights (packing off)."""
    d = {"opt": opt_dir, "llama": llama_dir}[request.param]
    prompts = ragged_prompts(7)
    mp = pytest.MonkeyPatch()
    mp.setattr(packed_weights, "ENABLED", False)
    try:
        with LLM(str(d), device="cpu", policy="resident", dtype="bfloat16") as llm:
            assert not _packed(llm)
            ref = [o.output_ids for o in llm.generate(prompts, NEW, GREEDY)]
    finally:
        mp.undo()
    return d, prompts, ref


def _packed(llm: LLM) -> int:
    return sum(isinstance(v, Packed) for _, v in llm.weights.homes.values())


@pytest.mark.parametrize("weights,mapped", [((100, 0, 0), False), ((0, 100, 0), False),
                                            ((0, 0, 100), True), ((0, 0, 100), False),
                                            ((30, 40, 30), True)])
def test_packed_placements_match_plain(bf16_ref, tmp_path, monkeypatch, weights, mapped):
    import flexrun.engine.pipeline as pipeline_mod
    d, prompts, ref = bf16_ref
    monkeypatch.setattr(pipeline_mod, "MAP_DISK", mapped)
    monkeypatch.setattr(disk, "MAP_MIN", 0)      # map the tiny model's parts too
    maps = {"n": 0}
    real_map = disk.DiskTier.map_read

    def spy_map(self, r):
        maps["n"] += 1
        return real_map(self, r)
    monkeypatch.setattr(disk.DiskTier, "map_read", spy_map)
    pol = Policy(gpu_batch_size=4, num_gpu_batches=2, weights_gpu=weights[0],
                 weights_cpu=weights[1], weights_disk=weights[2])
    with LLM(str(d), device="cpu", dtype="bfloat16", policy=pol,
             offload_dir=str(tmp_path)) as llm:
        n_layer_linears = sum(1 for n in llm.weights.homes
                              if n.startswith("layers.") and len(llm.spec.all_shapes()[n]) == 2)
        assert _packed(llm) >= n_layer_linears > 0
        outs = llm.generate(prompts, NEW, GREEDY)
    assert [o.output_ids for o in outs] == ref
    assert (maps["n"] > 0) == (mapped and weights[2] > 0)
    assert list(tmp_path.iterdir()) == []


def test_packed_resident_run_matches_transformers_bf16(bf16_ref):
    """The plain bf16 reference above is transformers' own bf16 greedy output, and so is the
    packed resident run."""
    d, prompts, ref = bf16_ref
    with LLM(str(d), device="cpu", policy="resident", dtype="bfloat16") as llm:
        assert _packed(llm) > 0
        got = [o.output_ids for o in llm.generate(prompts, NEW, GREEDY)]
    assert got == ref == hf_greedy(d, prompts, NEW, torch.bfloat16)
