"""compress_cache: K and V really are stored quantized, on every tier, with identical tokens
whichever tier, layout, batch split, overlap or attention device serves them."""
import pytest
import torch

from conftest import ragged_prompts
from flexrun import LLM, Policy, SamplingParams
from flexrun.engine.kvquant import CompressedKVSlot

GREEDY = SamplingParams(ignore_eos=True)
CACHES = {"gpu": (100, 0, 0), "cpu": (0, 100, 0), "disk": (0, 0, 100), "split": (30, 40, 30)}


def _run(d, prompts, tmp_path, **kw):
    with LLM(str(d), device="cpu", policy=Policy(compress_cache=True, **kw),
             offload_dir=str(tmp_path)) as llm:
        out = [o.output_ids for o in llm.generate(prompts, 8, GREEDY)]
        slots = list(llm.pipeline.kv.slots.values())
    return out, slots


@pytest.fixture(scope="module")
def llama_ref(llama_dir):
    prompts = ragged_prompts(6)
    with LLM(str(llama_dir), device="cpu", policy=Policy(compress_cache=True)) as llm:
        comp = [o.output_ids for o in llm.generate(prompts, 8, GREEDY)]
    with LLM(str(llama_dir), device="cpu") as llm:
        dense = [o.output_ids for o in llm.generate(prompts, 8, GREEDY)]
    return prompts, comp, dense


def test_cache_is_stored_packed(llama_dir, llama_ref, tmp_path):
    prompts, comp, dense = llama_ref
    out, slots = _run(llama_dir, prompts, tmp_path, cache_gpu=0, cache_cpu=100)
    assert out == comp
    assert slots and all(isinstance(s, CompressedKVSlot) for s in slots)
    codes, mins, _ = slots[0].planes
    assert codes.kv[0].dtype == torch.uint8 and mins.kv[0].dtype == torch.float16
    assert codes.kv[0].shape[-1] * 2 == slots[0].head_dim      # two 4-bit codes per byte
    # 4-bit keys change this random model's greedy tokens somewhere: the cache is not dense
    assert comp != dense


@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("overlap,cpu_attention,bs,nb", [(True, True, 2, 3), (False, False, 3, 2)])
def test_every_tier_same_tokens(llama_dir, llama_ref, tmp_path, cache, overlap, cpu_attention,
                                bs, nb):
    prompts, comp, _ = llama_ref
    c = CACHES[cache]
    out, _ = _run(llama_dir, prompts, tmp_path, cache_gpu=c[0], cache_cpu=c[1], cache_disk=c[2],
                  overlap=overlap, cpu_attention=cpu_attention, gpu_batch_size=bs,
                  num_gpu_batches=nb)
    assert out == comp
    assert not any(tmp_path.rglob("kv-*"))


def test_opt_compressed_cache_on_disk(opt_dir, tmp_path):
    prompts = ragged_prompts(5)
    with LLM(str(opt_dir), device="cpu", policy=Policy(compress_cache=True)) as llm:
        ref = [o.output_ids for o in llm.generate(prompts, 8, GREEDY)]
    out, _ = _run(opt_dir, prompts, tmp_path, cache_gpu=0, cache_disk=100, gpu_batch_size=2,
                  num_gpu_batches=3)
    assert out == ref
