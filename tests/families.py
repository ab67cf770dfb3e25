"""Tiny random transformers checkpoints of every family flexrun runs, two shapes each (the
second odd: head counts not powers of two, tied heads where the family allows); the MoE ones
with dense layers among the sparse (Qwen3-MoE), a shared expert (Qwen2-MoE), top-2 and top-3."""
from __future__ import annotations

from pathlib import Path

import torch

from conftest import VOCAB, make_tokenizer

COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              rms_norm_eps=1e-5, attention_dropout=0.0)

# name -> (transformers config class name, model class name, config kwargs)
SHAPES: dict[str, tuple[str, str, dict]] = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e6,
        max_position_embeddings=64, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 16})),
    "qwen2-odd": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=72, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
        max_position_embeddings=128)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, rope_theta=1e6,
        max_position_embeddings=128)),
    "qwen3-odd": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=60, intermediate_size=88, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, head_dim=20, tie_word_embeddings=True, attention_bias=True,
        max_position_embeddings=128)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=64,
        original_max_position_embeddings=16, rope_scaling={
            "rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 4.0],
            "long_factor": [1.5, 2.0, 3.0, 4.5, 6.0, 8.0, 10.0, 13.0]})),
    # the odd shape rotates half of each head (partial_rotary_factor: Phi-4-mini has 3/4)
    "phi3-odd": ("Phi3Config", "Phi3ForCausalLM", dict(
        hidden_size=72, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128,
        sliding_window=12, partial_rotary_factor=0.5)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        max_position_embeddings=128)),
    "gemma2-odd": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        hidden_size=72, intermediate_size=80, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=3, head_dim=24, query_pre_attn_scalar=32, sliding_window=6,
        attn_logit_softcapping=8.0, final_logit_softcapping=2.0,
        max_position_embeddings=128)),
    # Gemma-3: q/k norms, its global layers' rope scaled (linear) and the sliding ones' own
    # base; every 6th layer global (llama.cpp's fixed pattern: the GGUF round trip uses this
    # one), explicit layer types and a final soft-cap (the real models have none) on the odd
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
        max_position_embeddings=128, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    "gemma3-odd": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=72, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=3, head_dim=24, query_pre_attn_scalar=32, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=2.0, tie_word_embeddings=False,
        max_position_embeddings=128)),
    # SmolLM3: no RoPE on every 4th layer (or as no_rope_layers says); the odd shape slides
    # its NoPE layers (use_sliding_window)
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=2e6,
        max_position_embeddings=128)),
    "smollm3-odd": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(
        hidden_size=72, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=3, no_rope_layers=[1, 0, 1], use_sliding_window=True,
        sliding_window=6, tie_word_embeddings=False, max_position_embeddings=128)),
    # OLMo-2: no pre-norms, norms after attention and after the MLP, q/k norms over all heads;
    # OLMo-3 adds a window on 3 of 4 layers, their rope apart from the global layers'
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, rope_theta=5e5,
        max_position_embeddings=128)),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(
        hidden_size=72, intermediate_size=80, num_hidden_layers=5, num_attention_heads=6,
        num_key_value_heads=3, sliding_window=6, tie_word_embeddings=True,
        max_position_embeddings=128, rope_parameters={
            "full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5,
                               "original_max_position_embeddings": 32},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    # Granite: embeddings, residual branches and logits scaled, attention by its own multiplier
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, embedding_multiplier=12.0, residual_multiplier=0.22,
        attention_multiplier=0.0078125, logits_scaling=8.0, tie_word_embeddings=True,
        max_position_embeddings=128)),
    # Ministral (8B 2410): sliding and full layers by layer_types; Ministral 3: yarn with the
    # query scaling past its original context (16 positions here: the prompts pass it); Seed-OSS:
    # q/k/v biases without an o bias
    "ministral": ("MinistralConfig", "MinistralForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        tie_word_embeddings=False, max_position_embeddings=128)),
    "ministral3": ("Ministral3Config", "Ministral3ForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        max_position_embeddings=128, rope_parameters={
            "rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0, "beta_fast": 32.0,
            "beta_slow": 1.0, "original_max_position_embeddings": 16,
            "llama_4_scaling_beta": 0.1, "mscale": 1.0, "mscale_all_dim": 1.0})),
    "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, attention_bias=True, attention_out_bias=False,
        residual_dropout=0.0, tie_word_embeddings=False,
        max_position_embeddings=128)),
    # EXAONE 4: norms after attention and MLP only, per-head q/k norms, sliding layers with
    # RoPE and global ones without (3 : 1); no window on the odd shape (RoPE everywhere)
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=6, sliding_window_pattern=4,
        tie_word_embeddings=False, max_position_embeddings=128)),
    "exaone4-odd": ("Exaone4Config", "Exaone4ForCausalLM", dict(
        hidden_size=72, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, head_dim=12, sliding_window=None, tie_word_embeddings=True,
        layer_types=["full_attention"] * 2, max_position_embeddings=128)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8, tie_word_embeddings=False,
        max_position_embeddings=128)),
    "mistral-odd": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=72, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, head_dim=12, sliding_window=5, tie_word_embeddings=True,
        max_position_embeddings=128)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        tie_word_embeddings=False, max_position_embeddings=128)),
    "mixtral-odd": ("MixtralConfig", "MixtralForCausalLM", dict(
        hidden_size=72, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=3, sliding_window=6,
        tie_word_embeddings=True, max_position_embeddings=128)),
    # gpt-oss: attention sinks, q/k/v/o biases, sliding and full layers alternating, yarn;
    # router and experts with biases, the clamped swiglu (a smaller limit on the odd shape)
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=8, max_position_embeddings=128, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": False, "original_max_position_embeddings": 32, "rope_theta": 1.5e5})),
    "gpt_oss-odd": ("GptOssConfig", "GptOssForCausalLM", dict(
        hidden_size=72, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=12, num_local_experts=6, num_experts_per_tok=3,
        sliding_window=6, swiglu_limit=0.5, tie_word_embeddings=True,
        max_position_embeddings=128)),
    # GLM-4.5: a dense first layer, sigmoid routing over groups with a choice bias, scaled,
    # an ungated shared expert, half-rotary heads, q/k/v biases; q/k norms on the odd shape
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=3, n_shared_experts=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, first_k_dense_replace=1, attention_bias=True,
        tie_word_embeddings=False, max_position_embeddings=128)),
    "glm4_moe-odd": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        hidden_size=72, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=12, moe_intermediate_size=40, n_routed_experts=6,
        num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=0,
        norm_topk_prob=False, use_qk_norm=True, tie_word_embeddings=True,
        max_position_embeddings=128)),
    # Llama 4: sigmoid top-k routing that scales the experts' inputs, an ungated shared expert,
    # MoE layers interleaved with dense ones (intermediate_size_mlp), no RoPE on every 4th
    # layer, q/k L2-normed after RoPE elsewhere, interleaved RoPE pairs, llama3 rope scaling
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", dict(
        hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=1, interleave_moe_layer_step=2, tie_word_embeddings=False,
        max_position_embeddings=128, rope_parameters={
            "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama4-odd": ("Llama4TextConfig", "Llama4ForCausalLM", dict(
        hidden_size=72, intermediate_size=40, intermediate_size_mlp=80, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=3, head_dim=12, num_local_experts=6,
        num_experts_per_tok=2, no_rope_layers=[1, 0, 1], use_qk_norm=False,
        tie_word_embeddings=True, max_position_embeddings=128)),
    # OLMoE: q/k norms over all heads (pre-norm layers), top-k of a softmax over all experts;
    # q, k and v clamped on the odd shape (clip_qkv)
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False,
        tie_word_embeddings=False, max_position_embeddings=128)),
    "olmoe-odd": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        hidden_size=72, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True,
        clip_qkv=0.05, tie_word_embeddings=True, max_position_embeddings=128)),
    # all layers sparse with norm_topk_prob as llama.cpp computes them (qwen2moe: not
    # renormalised, qwen3moe: renormalised): the GGUF round trips use these two
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=80, norm_topk_prob=False, tie_word_embeddings=False,
        max_position_embeddings=128)),
    "qwen2_moe-odd": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        hidden_size=72, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=40,
        shared_expert_intermediate_size=56, norm_topk_prob=True, mlp_only_layers=[1],
        tie_word_embeddings=True, max_position_embeddings=128)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=48, norm_topk_prob=True, tie_word_embeddings=False,
        max_position_embeddings=128)),
    # hidden and expert widths whose fp16 rows are whole 16-byte units: transformers' grouped_mm
    # experts (its default on CUDA, bench.gpu_families) refuse others
    "qwen3_moe-odd": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=56, intermediate_size=88, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=3, head_dim=20, num_experts=6, num_experts_per_tok=3,
        moe_intermediate_size=40, norm_topk_prob=False, decoder_sparse_step=2,
        tie_word_embeddings=True, max_position_embeddings=128)),
}


def build_model(name: str, seed: int = 0):
    """The random transformers model of shape `name`, with norms and biases perturbed so every
    term matters (Gemma's norm weights start at 0: x * (1 + w)) and routers scaled up so the
    experts' weights differ clearly."""
    import transformers
    cfg_cls, model_cls, kw = SHAPES[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**COMMON, **kw)
    return perturb(getattr(transformers, model_cls)(cfg).eval())


def perturb(m):
    """m with its norms and biases perturbed, routers scaled up, sink logits and GLM's
    choice bias drawn (build_model's doing; for the tests that build models of their own)."""
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            if n.endswith(("mlp.gate.weight", "mlp.router.weight")):    # a router (a dense
                p.mul_(5.0)                                            # MLP has gate_proj)
            if n.endswith("sinks"):                 # gpt-oss: sink logits of either sign
                p.normal_(0.0, 1.0)
        for n, b in m.named_buffers():              # GLM-4.5's router's choice bias (0 at
            if n.endswith("e_score_correction_bias"):   # init: it would change nothing)
                b.normal_(0.0, 0.3)
    return m


def save_family(name: str, path: Path, seed: int = 0) -> Path:
    m = build_model(name, seed)
    m.save_pretrained(str(path), safe_serialization=True)
    make_tokenizer(path)
    return path
