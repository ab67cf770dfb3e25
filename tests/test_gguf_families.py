"""GGUF files of each family, written as llama.cpp's convert_hf_to_gguf.py writes them
(tests/gguf_writer.py), read back into the HF config and state dict of the tiny random
transformers model they came from: every tensor (name, shape, values), the config values, and
the logits of a transformers model built from the config and tensors read back. Mixtures of
experts (stacked ffn_*_exps) read back as the per-expert checkpoint save_pretrained writes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flexrun.models.gguf import gguf_config, iter_gguf_tensors
from flexrun.models.gguf_tokenizer import gguf_tokenizer
from gguf_writer import checkpoint_tensors, stored_value, write_gguf_like_llama_cpp

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
ODD = dict(SMALL, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}

# id: (config class, kwargs, tensor type, family-specific keys to compare)
CASES = {
    "llama": ("LlamaConfig", dict(SMALL, tie_word_embeddings=False, rope_theta=5e5), "f32",
              ["attention_bias", "mlp_bias"]),
    "llama-odd-bias-tied": ("LlamaConfig", dict(ODD, tie_word_embeddings=True,
                                                attention_bias=True, mlp_bias=True), "f16",
                            ["attention_bias", "mlp_bias"]),
    "llama3-rope": ("LlamaConfig", dict(SMALL, rope_theta=5e5, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}), "q8_0", []),
    "mistral-window": ("MistralConfig", dict(SMALL, sliding_window=16, head_dim=16), "f32",
                       ["sliding_window"]),
    # no window: a Llama in all but name, so the GGUF reads back as llama (head_dim 24 != 96/6)
    "mistral-odd-nowindow": ("MistralConfig", dict(ODD, num_key_value_heads=2, head_dim=24,
                                                   sliding_window=None, tie_word_embeddings=True),
                             "f32", []),
    "qwen2-yarn": ("Qwen2Config", dict(SMALL, tie_word_embeddings=False, rope_theta=1e6,
                                       rope_scaling=YARN), "f32", ["use_sliding_window"]),
    "qwen2-odd-tied-q8": ("Qwen2Config", dict(ODD, num_key_value_heads=2, tie_word_embeddings=True),
                          "q8_0", ["use_sliding_window", "sliding_window"]),
    "qwen3": ("Qwen3Config", dict(SMALL, head_dim=32, tie_word_embeddings=False), "f32",
              ["attention_bias", "use_sliding_window"]),
    "qwen3-odd-bias-tied": ("Qwen3Config", dict(ODD, head_dim=8, tie_word_embeddings=True,
                                                attention_bias=True), "f32", ["attention_bias"]),
    "phi3": ("Phi3Config", dict(SMALL, num_key_value_heads=4, tie_word_embeddings=False), "f32",
             ["original_max_position_embeddings", "sliding_window"]),
    "phi3-odd-longrope-partial": (
        "Phi3Config", dict(ODD, num_key_value_heads=2, tie_word_embeddings=True,
                           max_position_embeddings=256, original_max_position_embeddings=32,
                           sliding_window=48, rope_scaling={
                               "rope_type": "longrope", "partial_rotary_factor": 0.5,
                               "short_factor": [1.0, 1.25, 1.5, 2.0],
                               "long_factor": [1.5, 3.0, 4.5, 8.0]}),
        "f32", ["original_max_position_embeddings", "sliding_window"]),
    "gemma2": ("Gemma2Config", dict(SMALL, head_dim=32, query_pre_attn_scalar=32,
                                    sliding_window=16), "f32",
               ["attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                "sliding_window", "hidden_activation"]),
    "gemma2-odd-f16": ("Gemma2Config", dict(ODD, head_dim=24, query_pre_attn_scalar=24,
                                            sliding_window=24, attn_logit_softcapping=20.0,
                                            final_logit_softcapping=10.0), "f16",
                       ["attn_logit_softcapping", "final_logit_softcapping",
                        "query_pre_attn_scalar", "sliding_window"]),
    # 46 layers is gemma-2-27b to llama.cpp: queries scaled by 1/sqrt(n_embd/n_head), not head_dim
    "gemma2-27b-scaling": ("Gemma2Config", dict(SMALL, hidden_size=32, intermediate_size=16,
                                                num_hidden_layers=46, head_dim=16,
                                                query_pre_attn_scalar=8, sliding_window=16), "f32",
                           ["query_pre_attn_scalar"]),
    "granite": ("GraniteConfig", dict(SMALL, tie_word_embeddings=True, embedding_multiplier=12.0,
                                      residual_multiplier=0.25, attention_multiplier=0.0078125,
                                      logits_scaling=8.0), "f32",
                ["embedding_multiplier", "residual_multiplier", "attention_multiplier",
                 "logits_scaling"]),
    # SmolLM3: llama.cpp skips RoPE on every 4th layer (5 layers: one NoPE layer)
    "smollm3": ("SmolLM3Config", dict(SMALL, num_hidden_layers=5, tie_word_embeddings=False,
                                      rope_theta=2e6), "f32",
                ["no_rope_layer_interval", "attention_bias", "use_sliding_window"]),
    # OLMo-2 (no pre-norms, q/k norms over all heads); OLMo-3 with its window on 3 of 4
    # layers and yarn on the global ones (4.x-style keys: the sliding ones at 5e5, unscaled)
    "olmo2": ("Olmo2Config", dict(SMALL, tie_word_embeddings=False, rope_theta=5e5), "f32",
              ["attention_bias"]),
    "olmo3-yarn-f16": ("Olmo3Config", dict(ODD, num_hidden_layers=5, sliding_window=16,
                                           rope_theta=5e5, rope_scaling={
                                               "rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 32}),
                       "f16", ["sliding_window", "layer_types"]),
    # Gemma-3: llama.cpp makes every 6th layer global (7 layers: one), the sliding layers'
    # rope base 10000; the global rope scaled (linear) on one case, a final cap on the other
    "gemma3": ("Gemma3TextConfig", dict(SMALL, num_hidden_layers=7, head_dim=32,
                                        query_pre_attn_scalar=32, sliding_window=16,
                                        rope_parameters={
                                            "full_attention": {"rope_type": "linear",
                                                               "factor": 4.0, "rope_theta": 1e6},
                                            "sliding_attention": {"rope_type": "default",
                                                                  "rope_theta": 1e4}}), "f32",
               ["query_pre_attn_scalar", "sliding_window", "layer_types",
                "final_logit_softcapping", "hidden_activation"]),
    "gemma3-odd-f16-cap": ("Gemma3TextConfig", dict(ODD, num_hidden_layers=6, head_dim=24,
                                                    query_pre_attn_scalar=24, sliding_window=24,
                                                    final_logit_softcapping=10.0), "f16",
                           ["query_pre_attn_scalar", "sliding_window", "layer_types",
                            "final_logit_softcapping"]),
}
# mixtures of experts: id -> (config class, kwargs, tensor type, keys to compare)
MOE_CASES = {
    "mixtral": ("MixtralConfig", dict(SMALL, num_local_experts=4, num_experts_per_tok=2,
                                      tie_word_embeddings=False), "f32",
                ["num_local_experts", "num_experts_per_tok", "sliding_window"]),
    "mixtral-odd-window-tied-q8": (
        "MixtralConfig", dict(ODD, num_local_experts=3, num_experts_per_tok=2, sliding_window=16,
                              tie_word_embeddings=True), "q8_0",
        ["num_local_experts", "num_experts_per_tok", "sliding_window"]),
    "qwen2_moe-q8": ("Qwen2MoeConfig", dict(SMALL, num_experts=4, num_experts_per_tok=2,
                                            moe_intermediate_size=32,
                                            shared_expert_intermediate_size=48,
                                            norm_topk_prob=False), "q8_0",
                     ["num_experts", "num_experts_per_tok", "moe_intermediate_size",
                      "shared_expert_intermediate_size", "norm_topk_prob", "qkv_bias",
                      "mlp_only_layers"]),
    "olmoe": ("OlmoeConfig", dict(SMALL, num_experts=4, num_experts_per_tok=2,
                                  norm_topk_prob=False, tie_word_embeddings=False), "f32",
              ["num_experts", "num_experts_per_tok", "norm_topk_prob"]),
    # GLM-4.5: a dense first layer, 2 shared experts, half-rotary heads, q/k/v biases and
    # q/k norms, sigmoid routing scaled and not renormalised
    "glm4_moe": ("Glm4MoeConfig", dict(SMALL, num_hidden_layers=3, head_dim=16,
                                       moe_intermediate_size=32, n_routed_experts=6,
                                       num_experts_per_tok=2, n_shared_experts=2,
                                       first_k_dense_replace=1, routed_scaling_factor=1.5,
                                       norm_topk_prob=False, attention_bias=True,
                                       use_qk_norm=True, tie_word_embeddings=False), "f32",
                 ["n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "n_shared_experts", "first_k_dense_replace", "routed_scaling_factor",
                  "norm_topk_prob", "attention_bias", "use_qk_norm", "head_dim"]),
    # Llama 4: MoE layers every 2nd (dense ones of intermediate_size_mlp), a shared expert,
    # llama3 rope factors, NoPE on the 4th layer and q/k L2 norms as llama.cpp fixes them;
    # its experts read back stacked, as its checkpoint holds them
    "llama4": ("Llama4TextConfig", dict(SMALL, num_hidden_layers=4, head_dim=16,
                                        intermediate_size=32, intermediate_size_mlp=96,
                                        num_local_experts=4, num_experts_per_tok=1,
                                        interleave_moe_layer_step=2, tie_word_embeddings=False,
                                        rope_parameters={
                                            "rope_type": "llama3", "rope_theta": 5e5,
                                            "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 16}), "f32",
               ["num_local_experts", "num_experts_per_tok", "intermediate_size_mlp",
                "interleave_moe_layer_step", "use_qk_norm", "no_rope_layers", "head_dim"]),
    "qwen3_moe-f16": ("Qwen3MoeConfig", dict(ODD, head_dim=16, num_experts=6, num_experts_per_tok=3,
                                             moe_intermediate_size=40, norm_topk_prob=True,
                                             tie_word_embeddings=True), "f16",
                      ["num_experts", "num_experts_per_tok", "moe_intermediate_size",
                       "norm_topk_prob", "attention_bias", "head_dim", "mlp_only_layers"]),
}
HF_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM",
            "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
            "smollm3": "SmolLM3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
            "granite": "GraniteForCausalLM",
            "glm4_moe": "Glm4MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
            "olmo3": "Olmo3ForCausalLM",
            "mixtral": "MixtralForCausalLM", "llama4_text": "Llama4ForCausalLM",
            "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
COMMON = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
          "bos_token_id", "eos_token_id", "pad_token_id"]
SEQ = 80   # past Mistral / Gemma-2 / Phi-3 windows and Phi-3's original context (long factors)


def tiny_model(cls_name: str, kwargs: dict, seed: int = 0):
    import transformers
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls_name)(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():      # norms (Gemma's start at 0) and biases random: each term matters
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_from(cfg: dict, tensors: dict):
    """A transformers model built from a config dict and a state dict, as a user of both would."""
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = dict(cfg)
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if cfg["tie_word_embeddings"]
                                               else set()), (missing, unexpected)
    return model


def written(tmp_path, case: str, cases: dict, family: str | None = None):
    """(model, its config, GGUF path, tensor type, config read back) of a case written as
    llama.cpp writes it; the family (default the model's type), its HF class and the case's
    config keys read back as the model has them."""
    cls_name, kwargs, ttype, keys = cases[case]
    model = tiny_model(cls_name, kwargs)
    hf = model.config
    path = write_gguf_like_llama_cpp(model, tmp_path / f"{case}.gguf", tensor_type=ttype)
    cfg = gguf_config(path)
    family = family or hf.model_type
    assert cfg["model_type"] == family and cfg["architectures"] == [HF_CLASS[family]]
    for key in COMMON + keys:
        assert cfg[key] == getattr(hf, key), key
    return model, hf, path, ttype, cfg


@pytest.mark.parametrize("case", list(CASES))
def test_family_roundtrip(tmp_path, case):
    model, hf, path, ttype, cfg = written(
        tmp_path, case, CASES, "llama" if case == "mistral-odd-nowindow" else None)
    assert cfg["head_dim"] == getattr(hf, "head_dim", None) or hf.hidden_size // \
        hf.num_attention_heads
    assert cfg["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    rope = hf.rope_parameters.get("full_attention", hf.rope_parameters)   # Gemma-3: global
    assert cfg["rope_theta"] == rope["rope_theta"]

    sd = model.state_dict()
    want = {n: stored_value(t.numpy(), ttype) for n, t in sd.items()
            if not (n == "lm_head.weight" and hf.tie_word_embeddings)}
    got = dict(iter_gguf_tensors(path))
    assert set(got) == set(want)
    for name, arr in want.items():
        assert got[name].dtype == torch.float32 and got[name].shape == sd[name].shape, name
        assert (got[name] - torch.from_numpy(arr)).abs().max().item() <= 1e-6, name

    ours = hf_from(cfg, got)
    assert ours.config.rope_parameters == hf.rope_parameters
    ref = model
    if ttype != "f32":
        ref.load_state_dict({n: torch.from_numpy(a) for n, a in want.items()}, strict=False)
    ids = torch.randint(0, hf.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


def hf_from_dir(cfg: dict, tensors: dict, d):
    """A transformers model loaded with from_pretrained from a config dict and a checkpoint
    state dict (per-expert names, which transformers 5 fuses on loading)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = dict(cfg)
    AutoConfig.for_model(kw.pop("model_type"), **kw).save_pretrained(str(d))
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    return AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32,
                                                attn_implementation="eager").eval()


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_family_roundtrip(tmp_path, case):
    model, hf, path, ttype, cfg = written(tmp_path, case, MOE_CASES)

    sd = checkpoint_tensors(model)          # per expert, as save_pretrained writes them
    want = {n: torch.from_numpy(stored_value(t.numpy(), ttype, n)) for n, t in sd.items()
            if not (n == "lm_head.weight" and hf.tie_word_embeddings)}
    got = dict(iter_gguf_tensors(path))
    assert set(got) == set(want) and any(".experts.2." in n or "experts.gate_up" in n
                                         for n in got)
    for name, t in want.items():
        assert got[name].shape == t.shape, name
        assert (got[name] - t).abs().max().item() <= 1e-6, name
    (tmp_path / "ours").mkdir()
    (tmp_path / "ref").mkdir()
    ours = hf_from_dir(cfg, got, tmp_path / "ours")
    ref = hf_from_dir(hf.to_dict(), want, tmp_path / "ref")
    ids = torch.randint(0, hf.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
        if ttype == "f32":
            torch.testing.assert_close(ref(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_qwen2_yarn_and_phi3_longrope_config(tmp_path):
    """HF rope_scaling dicts: YaRN from rope.scaling.*, longrope from the rope_factors tensors."""
    qwen = tiny_model(*CASES["qwen2-yarn"][:2])
    cfg = gguf_config(write_gguf_like_llama_cpp(qwen, tmp_path / "q.gguf"))
    assert cfg["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 32}
    assert cfg["use_sliding_window"] is False and cfg["sliding_window"] is None
    phi = tiny_model(*CASES["phi3-odd-longrope-partial"][:2])
    path = write_gguf_like_llama_cpp(phi, tmp_path / "p.gguf")
    cfg = gguf_config(path)
    assert cfg["rope_scaling"] == {"rope_type": "longrope", "long_factor": [1.5, 3.0, 4.5, 8.0],
                                   "short_factor": [1.0, 1.25, 1.5, 2.0]}
    assert cfg["original_max_position_embeddings"] == 32 and cfg["max_position_embeddings"] == 256
    assert cfg["partial_rotary_factor"] == 0.5 and cfg["head_dim"] == 16
    assert not any("rope" in n for n, _ in iter_gguf_tensors(path))
    plain = gguf_config(write_gguf_like_llama_cpp(tiny_model(*CASES["phi3"][:2]),
                                                  tmp_path / "p4k.gguf"))
    assert plain["rope_scaling"] is None and "partial_rotary_factor" not in plain


def test_gemma2_defaults_follow_llama_cpp(tmp_path):
    """Keys a Gemma-2 GGUF may lack take llama.cpp's defaults (window 4096, caps 50 / 30)."""
    import gguf
    path = tmp_path / "g.gguf"
    w = gguf.GGUFWriter(str(path), "gemma2")
    for add, v in (("block_count", 2), ("embedding_length", 64), ("feed_forward_length", 96),
                   ("head_count", 4), ("head_count_kv", 2), ("key_length", 32),
                   ("layer_norm_rms_eps", 1e-6)):
        getattr(w, f"add_{add}")(v)
    w.add_tensor("token_embd.weight", np.zeros((128, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg = gguf_config(path)
    assert (cfg["sliding_window"], cfg["attn_logit_softcapping"],
            cfg["final_logit_softcapping"]) == (4096, 50.0, 30.0)
    assert cfg["query_pre_attn_scalar"] == 32 and cfg["rope_theta"] == 10000.0
    assert cfg["tie_word_embeddings"] is True and cfg["hidden_activation"] == "gelu_pytorch_tanh"


def test_embedded_tokenizer_and_token_ids_only(tmp_path):
    """With a tokenizer dir the GGUF carries llama.cpp's "gpt2" vocabulary (same ids as the
    tokenizer.json); without one it holds only special ids and gguf_tokenizer gives None."""
    from conftest import make_tokenizer
    from tokenizers import Tokenizer
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    make_tokenizer(tok_dir)
    ref = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    model = tiny_model("Qwen2Config", dict(SMALL, vocab_size=320))
    path = write_gguf_like_llama_cpp(model, tmp_path / "t.gguf", tokenizer_dir=tok_dir)
    tok = gguf_tokenizer(path)
    for text in ("the quick brown fox", "hello world, 0 1 2 3", "offloading  weights\n"):
        assert tok.encode(text).ids == ref.encode(text).ids, text
        assert tok.decode(tok.encode(text).ids) == text
    cfg = gguf_config(path)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
    bare = write_gguf_like_llama_cpp(model, tmp_path / "bare.gguf")
    assert gguf_tokenizer(bare) is None and gguf_config(bare)["eos_token_id"] == 2


def test_qwen2_pre_tokenizer_splits_single_digits():
    from flexrun.models.gguf_tokenizer import _pre_tokenizer
    split = [p for p, _ in _pre_tokenizer("qwen2").pre_tokenize_str("year 2024, it's")]
    assert split == ["year", "Ġ", "2", "0", "2", "4", ",", "Ġit", "'s"]
    llama3 = [p for p, _ in _pre_tokenizer("llama-bpe").pre_tokenize_str("year 2024")]
    assert llama3 == ["year", "Ġ", "202", "4"]


def test_writer_rejects_other_families():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        write_gguf_like_llama_cpp(model, "unused.gguf")
