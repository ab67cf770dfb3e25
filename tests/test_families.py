"""Every dense family (Qwen2, Qwen3, Phi-3, Gemma-2, Mistral with its window), two shapes each,
against transformers: greedy tokens of a ragged batch equal to transformers generating each
prompt alone, resident and under a disk-heavy placement with CPU attention; prompt logits
within 1e-4 (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

from conftest import hf_greedy, ragged_prompts
from families import SHAPES, save_family
from flexrun import LLM, Policy, SamplingParams

NEW = 20        # prompts of up to 16 tokens + 20 new: past every window and longrope switch
GREEDY = SamplingParams(ignore_eos=True)
DISK_HEAVY = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_gpu=0, weights_cpu=20,
                    weights_disk=80, cache_gpu=0, cache_cpu=0, cache_disk=100, act_gpu=0,
                    act_cpu=100, act_disk=0, cpu_attention=True)


@pytest.fixture(scope="module", params=sorted(SHAPES))
def family(request, tmp_path_factory):
    d = save_family(request.param, tmp_path_factory.mktemp(request.param))
    prompts = ragged_prompts(6, seed=11)
    return request.param, d, prompts, hf_greedy(d, prompts, NEW)


def test_resident_matches_transformers(family):
    name, d, prompts, ref = family
    with LLM(str(d), device="cpu", policy=Policy(gpu_batch_size=3, num_gpu_batches=2)) as llm:
        assert llm.spec.family == name.split("-")[0]
        outs = llm.generate(prompts, max_new_tokens=NEW, sampling=GREEDY)
    assert [o.output_ids for o in outs] == ref


def test_disk_heavy_cpu_attention_matches_transformers(family, tmp_path):
    name, d, prompts, ref = family
    with LLM(str(d), device="cpu", policy=DISK_HEAVY, offload_dir=str(tmp_path)) as llm:
        outs = llm.generate(prompts, max_new_tokens=NEW, sampling=GREEDY)
    assert [o.output_ids for o in outs] == ref
    assert list(tmp_path.iterdir()) == []


def test_prompt_logits_match_transformers(family):
    from transformers import AutoModelForCausalLM
    name, d, prompts, _ = family
    m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    long = [list(range(3, 3 + 40))]             # past the windows and the longrope switch
    with LLM(str(d), device="cpu") as llm:
        ours = llm.prompt_logits(prompts + long)
    for p, lg in zip(prompts + long, ours):
        with torch.no_grad():
            ref = m(torch.tensor([p])).logits[0]
        assert lg.shape == ref.shape
        rel = (lg - ref).abs().max() / ref.abs().max()
        assert rel < 1e-4, (name, rel)


def test_unsupported_architecture_is_one_line(tmp_path):
    import json
    from flexrun import FlexrunError
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "falcon", "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(FlexrunError, match="unsupported architecture 'FalconForCausalLM'"):
        LLM(str(tmp_path), device="cpu")
