"""flexrun's resident run against transformers: greedy tokens and logits (fp32, CPU)."""
import torch

from conftest import hf_greedy, ragged_prompts, tiny_llama
from flexrun import LLM, Policy, SamplingParams

NEW = 16


def test_greedy_matches_transformers(any_model_dir):
    prompts = ragged_prompts()
    ref = hf_greedy(any_model_dir, prompts, NEW)
    policy = Policy(gpu_batch_size=3, num_gpu_batches=2)
    with LLM(str(any_model_dir), device="cpu", policy=policy) as llm:
        outs = llm.generate(prompts, max_new_tokens=NEW, sampling=SamplingParams(ignore_eos=True))
    assert [o.output_ids for o in outs] == ref


def test_logits_match_transformers(any_model_dir):
    from transformers import AutoModelForCausalLM
    prompts = ragged_prompts(4, seed=3)
    m = AutoModelForCausalLM.from_pretrained(str(any_model_dir), dtype=torch.float32).eval()
    with LLM(str(any_model_dir), device="cpu", policy="resident") as llm:
        ours = llm.prompt_logits(prompts)
    for p, lg in zip(prompts, ours):
        with torch.no_grad():
            ref = m(torch.tensor([p])).logits[0]
        assert lg.shape == ref.shape
        rel = (lg - ref).abs().max() / ref.abs().max()
        assert rel < 1e-4, rel


def test_gqa_tied_and_llama3_rope(models_dir):
    d = tiny_llama(models_dir / "llama3", kv_heads=1, tie=True, seed=5, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})
    prompts = ragged_prompts(3, seed=7)
    ref = hf_greedy(d, prompts, NEW)
    with LLM(str(d), device="cpu", policy="resident") as llm:
        outs = llm.generate(prompts, max_new_tokens=NEW, sampling=SamplingParams(ignore_eos=True))
    assert [o.output_ids for o in outs] == ref


def test_eos_stops_and_is_reported(llama_dir):
    prompts = ragged_prompts(3)
    with LLM(str(llama_dir), device="cpu") as llm:
        free = llm.generate(prompts, max_new_tokens=8, sampling=SamplingParams(ignore_eos=True))
        stop_tok = free[0].output_ids[3]
        outs = llm.generate(prompts, max_new_tokens=8,
                            sampling=SamplingParams(stop_token_ids=[stop_tok]))
    o = outs[0]
    assert o.output_ids == free[0].output_ids[:free[0].output_ids.index(stop_tok) + 1]
    assert o.finish_reason == "stop"


def test_text_prompts_and_decode(opt_dir):
    with LLM(str(opt_dir), device="cpu") as llm:
        outs = llm.generate(["hello world", "the quick brown fox"], max_new_tokens=5,
                            sampling=SamplingParams(ignore_eos=True))
        ids = llm.tokenizer.encode("hello world").ids
        same = llm.generate([ids], max_new_tokens=5, sampling=SamplingParams(ignore_eos=True))
    assert outs[0].output_ids == same[0].output_ids
    assert isinstance(outs[1].text, str) and len(outs[1].output_ids) == 5
    assert outs[0].prompt_ids[0] == 1  # the tokenizer's BOS


def test_sampling_seeded_reproducible_and_topk1_is_greedy(llama_dir):
    prompts = ragged_prompts(4)
    s = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
    with LLM(str(llama_dir), device="cpu", policy=Policy(gpu_batch_size=4)) as llm:
        a = llm.generate(prompts, max_new_tokens=10, sampling=s)
        greedy = llm.generate(prompts, max_new_tokens=10, sampling=SamplingParams(ignore_eos=True))
        top1 = llm.generate(prompts, max_new_tokens=10, sampling=SamplingParams(
            temperature=1.3, top_k=1, seed=9, ignore_eos=True))
        other = llm.generate(prompts, max_new_tokens=10, sampling=SamplingParams(
            temperature=0.9, top_p=0.9, top_k=50, seed=124, ignore_eos=True))
    policy = Policy(gpu_batch_size=1, num_gpu_batches=2)
    with LLM(str(llama_dir), device="cpu", policy=policy) as llm:
        b = llm.generate(prompts, max_new_tokens=10, sampling=s)
    assert [o.output_ids for o in a] == [o.output_ids for o in b]  # batching does not matter
    assert [o.output_ids for o in top1] == [o.output_ids for o in greedy]
    assert [o.output_ids for o in other] != [o.output_ids for o in a]


def test_dummy_preset_runs():
    with LLM("dummy:opt-125m", device="cpu", policy=Policy(gpu_batch_size=2)) as llm:
        outs = llm.generate([[5, 6, 7], [8]], max_new_tokens=3,
                            sampling=SamplingParams(ignore_eos=True))
    assert [len(o.output_ids) for o in outs] == [3, 3]
    assert outs[0].text is None
