"""The static decode step that CUDA graphs capture (engine/graphs.py), run eagerly on the CPU.

It writes K/V at a cache index held in a tensor and attends over whole KV slots with a mask,
so it must give the plain run's greedy tokens for ragged prompts, several GPU batches, blocks
of different lengths reusing slots, and placements mixing resident and offloaded units."""
import pytest
import torch

from conftest import hf_greedy, ragged_prompts
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
