"""`dummy:<preset>` models: real shapes, cheap deterministic synthetic weights.

Weights are made directly on the device the storage layer asks for, by tiling a small seeded
random pattern, so a 30B-175B model appears in seconds without a checkpoint.

Synthetic router weights say nothing about routing, so the MoE presets' layers draw each
token's top-k experts from a stated distribution instead of multiplying by them: environment
FLEXRUN_DUMMY_ROUTING = uniform (default) | zipf | zipf:<s> (models/moe.py drawn_experts), or
router to compute the synthetic router after all. The model's moe_stats records which.
"""
from __future__ import annotations

import os
import zlib

import torch

from flexrun.config import FlexrunError
from flexrun.models.checkpoint import Checkpoint
from flexrun.models.hf_config import spec_from_config
from flexrun.models.moe import parse_routing
from flexrun.models.spec import ModelSpec

_OPT = {  # name: (hidden, layers, heads, ffn)
    "opt-125m": (768, 12, 12, 3072), "opt-350m": (1024, 24, 16, 4096),
    "opt-1.3b": (2048, 24, 32, 8192), "opt-2.7b": (2560, 32, 32, 10240),
    "opt-6.7b": (4096, 32, 32, 16384), "opt-13b": (5120, 40, 40, 20480),
    "opt-30b": (7168, 48, 56, 28672), "opt-66b": (9216, 64, 72, 36864),
    "opt-175b": (12288, 96, 96, 49152),
}
_LLAMA = {  # name: (hidden, layers, heads, kv_heads, ffn, vocab, rope_theta)
    "llama-7b": (4096, 32, 32, 32, 11008, 32000, 10000.0),
    "llama-13b": (5120, 40, 40, 40, 13824, 32000, 10000.0),
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256, 500000.0),
    "llama-70b": (8192, 80, 64, 8, 28672, 32000, 10000.0),
}
# the new dense families at their real shapes (HF config.json fields)
_FAMILIES = {
    "qwen2.5-72b": {"model_type": "qwen2", "hidden_size": 8192, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8,
                    "intermediate_size": 29568, "vocab_size": 152064, "rope_theta": 1e6,
                    "max_position_embeddings": 32768, "tie_word_embeddings": False,
                    "rms_norm_eps": 1e-6, "eos_token_id": 151645},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4,
                   "intermediate_size": 18944, "vocab_size": 152064, "rope_theta": 1e6,
                   "max_position_embeddings": 32768, "tie_word_embeddings": False,
                   "rms_norm_eps": 1e-6, "eos_token_id": 151645},
    "qwen3-32b": {"model_type": "qwen3", "hidden_size": 5120, "num_hidden_layers": 64,
                  "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
                  "intermediate_size": 25600, "vocab_size": 151936, "rope_theta": 1e6,
                  "max_position_embeddings": 40960, "tie_word_embeddings": False,
                  "rms_norm_eps": 1e-6, "eos_token_id": 151645},
    "phi3-medium": {"model_type": "phi3", "hidden_size": 5120, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 10,
                    "intermediate_size": 17920, "vocab_size": 32064, "rope_theta": 10000.0,
                    "max_position_embeddings": 4096, "tie_word_embeddings": False,
                    "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 32000},
    "gemma2-27b": {"model_type": "gemma2", "hidden_size": 4608, "num_hidden_layers": 46,
                   "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
                   "intermediate_size": 36864, "vocab_size": 256000, "rope_theta": 10000.0,
                   "max_position_embeddings": 8192, "query_pre_attn_scalar": 144,
                   "sliding_window": 4096, "attn_logit_softcapping": 50.0,
                   "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh",
                   "rms_norm_eps": 1e-6, "bos_token_id": 2, "eos_token_id": 1},
    # Gemma-3 text decoders (the multimodal checkpoints' language models): 5 sliding layers of
    # 1024 positions per global one, global rope 1e6 scaled by 8 (linear), local rope 1e4
    "gemma3-12b": {"model_type": "gemma3_text", "hidden_size": 3840, "num_hidden_layers": 48,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
                   "intermediate_size": 15360, "vocab_size": 262208, "sliding_window": 1024,
                   "query_pre_attn_scalar": 256, "rope_theta": 1e6,
                   "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    "gemma3-27b": {"model_type": "gemma3_text", "hidden_size": 5376, "num_hidden_layers": 62,
                   "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
                   "intermediate_size": 21504, "vocab_size": 262208, "sliding_window": 1024,
                   "query_pre_attn_scalar": 168, "rope_theta": 1e6,
                   "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    "smollm3-3b": {"model_type": "smollm3", "hidden_size": 2048, "num_hidden_layers": 36,
                   "num_attention_heads": 16, "num_key_value_heads": 4,
                   "intermediate_size": 11008, "vocab_size": 128256, "rope_theta": 5e6,
                   "max_position_embeddings": 65536, "tie_word_embeddings": True,
                   "eos_token_id": 128012},
    "mistral-7b": {"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8,
                   "intermediate_size": 14336, "vocab_size": 32000, "rope_theta": 10000.0,
                   "max_position_embeddings": 32768, "sliding_window": 4096,
                   "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "bos_token_id": 1,
                   "eos_token_id": 2},
    # tiny shapes whose decode steps are launch-bound: `flexrun profile` times the engine's
    # own layer calls on them (cli/layer_calls.py); 4-bit groups of 64 divide every GEMM
    "llama-tiny": {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 8,
                   "num_attention_heads": 4, "num_key_value_heads": 2,
                   "intermediate_size": 512, "vocab_size": 1024, "rope_theta": 10000.0,
                   "max_position_embeddings": 2048, "tie_word_embeddings": False,
                   "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2},
    # mixtures of experts
    "mixtral-8x7b": {"model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8,
                     "intermediate_size": 14336, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "vocab_size": 32000, "rope_theta": 1e6,
                     "max_position_embeddings": 32768, "tie_word_embeddings": False,
                     "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2},
    "mixtral-8x22b": {"model_type": "mixtral", "hidden_size": 6144, "num_hidden_layers": 56,
                      "num_attention_heads": 48, "num_key_value_heads": 8,
                      "intermediate_size": 16384, "num_local_experts": 8,
                      "num_experts_per_tok": 2, "vocab_size": 32768, "rope_theta": 1e6,
                      "max_position_embeddings": 65536, "tie_word_embeddings": False,
                      "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2},
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                      "intermediate_size": 6144, "moe_intermediate_size": 768,
                      "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
                      "vocab_size": 151936, "rope_theta": 1e6, "max_position_embeddings": 40960,
                      "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
                      "eos_token_id": 151645},
    **{f"gpt-oss-{size}": {"model_type": "gpt_oss", "hidden_size": 2880,
                           "num_hidden_layers": layers, "num_attention_heads": 64,
                           "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 2880,
                           "num_local_experts": experts, "num_experts_per_tok": 4,
                           "vocab_size": 201088, "sliding_window": 128,
                           "max_position_embeddings": 131072, "tie_word_embeddings": False,
                           "rope_parameters": {"rope_type": "yarn", "factor": 32.0,
                                               "beta_fast": 32.0, "beta_slow": 1.0,
                                               "truncate": False, "rope_theta": 150000.0,
                                               "original_max_position_embeddings": 4096},
                           "eos_token_id": 200002}
       for size, layers, experts in (("20b", 24, 32), ("120b", 36, 128))},
    "glm-4.5-air": {"model_type": "glm4_moe", "hidden_size": 4096, "num_hidden_layers": 46,
                    "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128,
                    "intermediate_size": 10944, "moe_intermediate_size": 1408,
                    "n_routed_experts": 128, "num_experts_per_tok": 8, "n_shared_experts": 1,
                    "first_k_dense_replace": 1, "partial_rotary_factor": 0.5,
                    "attention_bias": True, "vocab_size": 151552, "rope_theta": 1e6,
                    "max_position_embeddings": 131072, "tie_word_embeddings": False,
                    "eos_token_id": [151329, 151336, 151338]},
    "llama4-scout": {"model_type": "llama4_text", "hidden_size": 5120, "num_hidden_layers": 48,
                     "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
                     "intermediate_size": 8192, "intermediate_size_mlp": 16384,
                     "num_local_experts": 16, "num_experts_per_tok": 1,
                     "interleave_moe_layer_step": 1, "vocab_size": 202048,
                     "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5,
                                         "factor": 16.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 1.0,
                                         "original_max_position_embeddings": 8192},
                     "max_position_embeddings": 10485760, "tie_word_embeddings": False,
                     "eos_token_id": [200001, 200007, 200008]},
    "olmoe-1b-7b": {"model_type": "olmoe", "hidden_size": 2048, "num_hidden_layers": 16,
                    "num_attention_heads": 16, "num_key_value_heads": 16,
                    "intermediate_size": 1024, "num_experts": 64, "num_experts_per_tok": 8,
                    "vocab_size": 50304, "rope_theta": 10000.0, "max_position_embeddings": 4096,
                    "tie_word_embeddings": False, "eos_token_id": 50279},
    "qwen2-57b-a14b": {"model_type": "qwen2_moe", "hidden_size": 3584, "num_hidden_layers": 28,
                       "num_attention_heads": 28, "num_key_value_heads": 4,
                       "intermediate_size": 18944, "moe_intermediate_size": 2560,
                       "shared_expert_intermediate_size": 20480, "num_experts": 64,
                       "num_experts_per_tok": 8, "norm_topk_prob": False,
                       "vocab_size": 151936, "rope_theta": 1e6,
                       "max_position_embeddings": 32768, "tie_word_embeddings": False,
                       "rms_norm_eps": 1e-6, "eos_token_id": 151643},
}
_FAMILIES["mixtral-tiny"] = {**_FAMILIES["llama-tiny"], "model_type": "mixtral",
                             "num_local_experts": 8, "num_experts_per_tok": 2}
ROUTING_ENV = "FLEXRUN_DUMMY_ROUTING"
PRESETS = sorted(_OPT) + sorted(_LLAMA) + sorted(_FAMILIES)
_PATTERN = 1 << 16


def dummy_spec(preset: str) -> ModelSpec:
    if preset in _OPT:
        h, n, heads, f = _OPT[preset]
        return ModelSpec(arch="opt", vocab_size=50272, hidden_size=h, num_layers=n,
                         num_heads=heads, num_kv_heads=heads, head_dim=h // heads, ffn_dim=f,
                         max_positions=2048, do_layer_norm_before=preset != "opt-350m",
                         word_embed_proj_dim=512 if preset == "opt-350m" else None,
                         final_layer_norm=preset != "opt-350m", bos_token_id=2,
                         eos_token_ids=[2], pad_token_id=1, name=f"dummy:{preset}")
    if preset in _LLAMA:
        h, n, heads, kv, f, vocab, theta = _LLAMA[preset]
        return ModelSpec(arch="llama", vocab_size=vocab, hidden_size=h, num_layers=n,
                         num_heads=heads, num_kv_heads=kv, head_dim=h // heads, ffn_dim=f,
                         max_positions=4096, norm_eps=1e-5, rope_theta=theta,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_ids=[2],
                         name=f"dummy:{preset}")
    if preset in _FAMILIES:
        spec = spec_from_config(_FAMILIES[preset], name=f"dummy:{preset}")
        if spec.num_experts:
            spec.routing = dummy_routing()
        return spec
    raise FlexrunError(f"unknown dummy preset {preset!r}; choose one of {', '.join(PRESETS)}")


def dummy_routing() -> str:
    """How a dummy model's MoE layers pick experts (ROUTING_ENV; uniform by default)."""
    routing = os.environ.get(ROUTING_ENV, "").strip() or "uniform"
    if routing != "router":
        try:
            parse_routing(routing)
        except ValueError as e:
            raise FlexrunError(f"{ROUTING_ENV}: {e} or router") from None
    return routing


def synthetic_tensor(name: str, shape: tuple[int, ...], device: torch.device,
                     dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """A deterministic tensor for `name`: ones for norm scales, zeros for biases,
    otherwise a seeded N(0, 0.02) pattern tiled over the tensor (cheap on any device)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    pattern = (torch.randn(_PATTERN + 1, generator=g) * 0.02).to(dtype=dtype, device=device)
    out = torch.empty(shape, dtype=dtype, device=device)
    flat = out.view(-1)
    n = flat.numel()
    # a period of _PATTERN + 1 keeps rows of power-of-two width from repeating exactly;
    # the filled prefix is doubled until the tensor is full (log2 copies)
    filled = min(n, _PATTERN + 1)
    flat[:filled].copy_(pattern[:filled])
    while filled < n:
        m = min(filled, n - filled)
        flat[filled:filled + m].copy_(flat[:m])
        filled += m
    return out


def open_dummy(preset: str) -> Checkpoint:
    spec = dummy_spec(preset)

    def iter_tensors(device_for, names=None):
        for name, shape in spec.all_shapes().items():
            if names is None or name in names:
                yield name, synthetic_tensor(name, shape, device_for(name))
    return Checkpoint(spec, iter_tensors, tokenizer=None, source=f"dummy:{preset}")
