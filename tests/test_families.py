"""Every family (Qwen2, Qwen3, Phi-3, Gemma-2, Mistral with its window; the mixtures of experts
Mixtral, Qwen2-MoE, Qwen3-MoE), two shapes each, against transformers: greedy tokens of a
ragged batch equal to transformers generating each prompt alone, resident and under a
disk-heavy placement with CPU attention (each expert a tensor of its own tier); prompt logits
within 1e-4 (fp32, CPU)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import hf_greedy, ragged_prompts
from families import SHAPES, perturb, save_family
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
    with LLM(str(d), device="cpu", policy="resident") as llm:
        ours = llm.prompt_logits(prompts + long)
    for p, lg in zip(prompts + long, ours):
        with torch.no_grad():
            ref = m(torch.tensor([p])).logits[0]
        assert lg.shape == ref.shape
        rel = (lg - ref).abs().max() / ref.abs().max()
        assert rel < 1e-4, (name, rel)


@pytest.mark.parametrize("naming", ["hub", "state_dict"])
def test_gemma3_multimodal_checkpoint_runs_its_decoder(naming, tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint (the 4B / 12B / 27B on the Hub): its text
    decoder runs from text_config, the vision tower is left out; the tensor names as the Hub
    files have them (language_model.model.*) and as transformers 5 holds them in memory
    (model.language_model.*) give transformers' greedy tokens."""
    import transformers
    from safetensors.torch import save_file
    from conftest import make_tokenizer
    from families import COMMON
    text = dict(COMMON, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                query_pre_attn_scalar=16, sliding_window=6, sliding_window_pattern=2,
                max_position_embeddings=128)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision,
                                    mm_tokens_per_image=4)
    torch.manual_seed(3)
    m = perturb(transformers.Gemma3ForConditionalGeneration(cfg).eval())
    m.save_pretrained(str(tmp_path), safe_serialization=True)
    if naming == "state_dict":
        (tmp_path / "model.safetensors").unlink()
        sd = {k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}
        assert any(k.startswith("model.language_model.") for k in sd)
        save_file(sd, str(tmp_path / "model.safetensors"))
    make_tokenizer(tmp_path)
    prompts = ragged_prompts(4, seed=5)
    ref = hf_greedy(tmp_path, prompts, 12)
    with LLM(str(tmp_path), device="cpu", policy=Policy(gpu_batch_size=2,
                                                         num_gpu_batches=2)) as llm:
        assert llm.spec.family == "gemma3" and llm.spec.num_layers == 3
        outs = llm.generate(prompts, max_new_tokens=12, sampling=GREEDY)
    assert [o.output_ids for o in outs] == ref


@pytest.mark.parametrize("tie", [False, True])
def test_mistral3_image_text_checkpoint_runs_its_decoder(tmp_path, tie):
    """A Mistral3ForConditionalGeneration checkpoint (Mistral Small 3.x, Magistral): its
    Mistral text decoder runs from text_config, the vision tower and projector are left out,
    transformers' greedy tokens (an untied or a tied head)."""
    import transformers
    from conftest import make_tokenizer
    from families import COMMON
    text = dict(COMMON, model_type="mistral", hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=128, sliding_window=None, tie_word_embeddings=tie)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14, head_dim=16)
    cfg = transformers.Mistral3Config(text_config=text, vision_config=vision,
                                      tie_word_embeddings=tie)
    torch.manual_seed(4)
    m = perturb(transformers.Mistral3ForConditionalGeneration(cfg).eval())
    m.save_pretrained(str(tmp_path), safe_serialization=True)
    make_tokenizer(tmp_path)
    prompts = ragged_prompts(4, seed=6)
    ref = hf_greedy(tmp_path, prompts, 10, model_cls=transformers.Mistral3ForConditionalGeneration)
    with LLM(str(tmp_path), device="cpu", policy="resident") as llm:
        assert llm.spec.family == "mistral" and llm.spec.tie_word_embeddings == tie
        assert [o.output_ids for o in llm.generate(prompts, 10, GREEDY)] == ref


def test_sparse_configs_take_transformers_defaults():
    """Configs as the Hub holds them: a llava text_config with only what differs from
    LlamaConfig's defaults; Llama 4's empty no_rope_layers (every 4th layer without RoPE);
    EXAONE 4's "LLLG" pattern and default window (RoPE off on its global layers)."""
    from flexrun.models.hf_config import spec_from_config
    llava = spec_from_config({"model_type": "llava", "text_config": {
        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-5,
        "vocab_size": 32064}})
    assert (llava.family, llava.hidden_size, llava.num_layers, llava.ffn_dim,
            llava.vocab_size) == ("llama", 4096, 32, 11008, 32064)
    scout = spec_from_config({"model_type": "llama4", "text_config": {
        "model_type": "llama4_text", "hidden_size": 64, "intermediate_size": 32,
        "intermediate_size_mlp": 96, "num_hidden_layers": 8, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 320, "no_rope_layers": []}})
    assert scout.nope_layers == (3, 7) and scout.qk_l2_norm
    exa = spec_from_config({"model_type": "exaone4", "hidden_size": 64,
                            "intermediate_size": 96, "num_hidden_layers": 8,
                            "num_attention_heads": 4, "vocab_size": 320,
                            "sliding_window_pattern": "LLLG"})
    assert exa.sliding_window == 4096 and exa.window_layers == (0, 1, 2, 4, 5, 6)
    assert exa.nope_layers == (3, 7)


@pytest.mark.parametrize("method", ["fp8", "awq"])
def test_quantized_checkpoint_is_refused_in_one_line(tmp_path, method):
    """FP8 / AWQ / GPTQ safetensors hold scales flexrun does not read: refused, not run."""
    import json
    from flexrun import FlexrunError
    d = save_family("qwen3", tmp_path / "q")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlexrunError, match=f"is a {method}-quantized checkpoint"):
        LLM(str(d), device="cpu")


def test_unsupported_architecture_is_one_line(tmp_path):
    import json
    from flexrun import FlexrunError
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "falcon", "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(FlexrunError, match="unsupported architecture 'FalconForCausalLM'"):
        LLM(str(tmp_path), device="cpu")


@pytest.mark.parametrize("name", ["gemma2-odd", "gemma3-odd", "qwen3", "phi3", "qwen3_moe-odd",
                                  "gpt_oss-odd", "llama4-odd", "glm4_moe", "olmo3"])
def test_pipeline_stages_match_one_process(name, tmp_path):
    """Two stages (gloo, one process each) give the single process's tokens."""
    d = save_family(name, tmp_path / name)
    prompts = ragged_prompts(4, seed=2)
    with LLM(str(d), device="cpu", policy="resident") as llm:
        ref = [o.output_ids for o in llm.generate(prompts, 12, GREEDY)]
    with LLM(str(d), device="cpu", policy=Policy(gpu_batch_size=2, num_gpu_batches=2),
             num_gpus=2) as llm:
        outs = llm.generate(prompts, 12, GREEDY)
    assert [o.output_ids for o in outs] == ref


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "qwen2-odd", "phi3-odd", "mistral",
                                  "qwen2_moe-odd", "gpt_oss", "smollm3-odd", "olmo2", "olmoe-odd",
                                  "llama4", "glm4_moe-odd"])
def test_4bit_weights_and_cache_run_offloaded(name, tmp_path):
    """4-bit weights and KV on the disk / CPU tiers run for every family; the compressed run
    keeps most greedy tokens of the plain one (compression changes the math)."""
    d = save_family(name, tmp_path / name)
    prompts = ragged_prompts(4, seed=4)
    with LLM(str(d), device="cpu", policy="resident") as llm:
        ref = [o.output_ids for o in llm.generate(prompts, 8, GREEDY)]
    pol = Policy(gpu_batch_size=2, num_gpu_batches=2, weights_gpu=0, weights_cpu=50,
                 weights_disk=50, cache_gpu=0, cache_cpu=100, cache_disk=0,
                 compress_weight=True, compress_cache=True, quant_group=16)
    (tmp_path / "off").mkdir()
    with LLM(str(d), device="cpu", policy=pol, offload_dir=str(tmp_path / "off")) as llm:
        outs = [o.output_ids for o in llm.generate(prompts, 8, GREEDY)]
    assert [len(o) for o in outs] == [8] * 4
    assert sum(a == b for o, r in zip(outs, ref) for a, b in zip(o, r)) >= 8


PRESETS = {"qwen2.5-72b": (72.7e9, "qwen2"), "qwen3-32b": (32.8e9, "qwen3"),
           "phi3-medium": (14.0e9, "phi3"), "gemma2-27b": (27.2e9, "gemma2"),
           "gemma3-12b": (11.77e9, "gemma3"), "gemma3-27b": (27.01e9, "gemma3"),
           "smollm3-3b": (3.075e9, "smollm3"), "gpt-oss-20b": (20.91e9, "gpt_oss"),
           "gpt-oss-120b": (116.83e9, "gpt_oss"), "olmoe-1b-7b": (6.92e9, "olmoe"),
           "glm-4.5-air": (106.85e9, "glm4_moe"),
           "llama4-scout": (107.77e9, "llama4"),     # its text decoder (109B with vision)
           "mistral-7b": (7.24e9, "mistral"), "mixtral-8x7b": (46.7e9, "mixtral"),
           "mixtral-8x22b": (141e9, "mixtral"), "qwen3-30b-a3b": (30.5e9, "qwen3_moe"),
           "qwen2-57b-a14b": (57e9, "qwen2_moe")}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_dummy_presets_at_real_shapes(preset):
    from flexrun.models.dummy import dummy_spec
    params, family = PRESETS[preset]
    spec = dummy_spec(preset)
    assert abs(spec.num_params() / params - 1) < 0.01
    assert spec.family == family


def test_policy_search_for_a_72b_puts_weights_on_disk(capsys):
    from flexrun.cli import main
    assert main(["policy", "search", "--model", "dummy:qwen2.5-72b", "--prompt-len", "512",
                 "--gen-len", "32", "--gpu-mem", "24GiB", "--cpu-mem", "100GiB", "--disk-mem",
                 "60GiB", "--device", "cuda", "--profile",
                 str(Path(__file__).parents[1] / "policies/profiles/h200.json")]) == 0
    out = capsys.readouterr().out
    weights = out.split("weights ")[1].split(" ")[0].split("/")
    assert int(weights[2].rstrip(",")) > 0 and "predicted:" in out


# (olmo3's shape rotates its sliding layers at a base of their own, which no GGUF key holds;
# tests/test_gguf_families.py round-trips OLMo-3 as its converter writes it)
@pytest.mark.parametrize("name", ["qwen2", "qwen3-odd", "phi3", "gemma2-odd", "gemma3",
                                  "smollm3", "olmo2", "mistral", "mixtral-odd", "qwen2_moe",
                                  "qwen3_moe", "glm4_moe-odd", "olmoe", "granite", "llama4"])
def test_gguf_round_trip_same_tokens(name, tmp_path):
    """The random model written as llama.cpp's converter writes it (q/k permutation where it
    permutes, Gemma norms +1, Phi-3's fused tensors and rope factors, stacked experts, ...),
    loaded from the GGUF: the same greedy tokens as transformers on the original."""
    from families import build_model
    from gguf_writer import write_gguf_like_llama_cpp
    m = build_model(name)
    d = tmp_path / "hf"
    m.save_pretrained(str(d), safe_serialization=True)
    path = write_gguf_like_llama_cpp(m, tmp_path / f"{name}.gguf")
    prompts = ragged_prompts(4, seed=5)
    ref = hf_greedy(d, prompts, 16)
    with LLM(str(path), device="cpu", policy=Policy(gpu_batch_size=2, num_gpu_batches=2)) as llm:
        assert llm.spec.family == name.split("-")[0]
        outs = llm.generate(prompts, max_new_tokens=16, sampling=GREEDY)
    assert [o.output_ids for o in outs] == ref
