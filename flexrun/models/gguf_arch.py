"""What differs between the GGUF architectures flexrun reads, as llama.cpp writes and reads them.

Each entry undoes what llama.cpp's convert_hf_to_gguf.py (conversion/*.py upstream) did to an HF
checkpoint: the tensor names (gguf-py/gguf/tensor_mapping.py), the q/k row permutation, the +1
on Gemma norms, and which config.json values it kept in the metadata and how src/llama-model.cpp
reads them back (defaults included). The result is what transformers' config.json and state dict
hold for the family.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

# blk.N.<gguf name> -> model.layers.N.<HF name> (gguf-py tensor_mapping.py, MODEL_TENSORS)
_ATTN_MLP = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
LLAMA_LAYERS = {**_ATTN_MLP, "ffn_norm": "post_attention_layernorm"}
# Qwen3: q_norm / k_norm -> attn_q_norm / attn_k_norm (MODEL_TENSOR.ATTN_Q_NORM, ATTN_K_NORM)
QWEN3_LAYERS = {**LLAMA_LAYERS, "attn_q_norm": "self_attn.q_norm",
                "attn_k_norm": "self_attn.k_norm"}
# Phi-3 keeps HF's fused tensors: qkv_proj -> attn_qkv, gate_up_proj -> ffn_up (holding
# [gate; up], llama-model.cpp loads it as {n_embd, 2 * n_ff} and runs LLM_FFN_SWIGLU on it)
PHI3_LAYERS = {"attn_norm": "input_layernorm", "attn_qkv": "self_attn.qkv_proj",
               "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}
# Gemma-2's sandwich norms: post_attention_layernorm -> post_attention_norm (ATTN_POST_NORM),
# pre_feedforward_layernorm -> ffn_norm, post_feedforward_layernorm -> post_ffw_norm
GEMMA2_LAYERS = {**_ATTN_MLP, "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm",
                 "post_ffw_norm": "post_feedforward_layernorm"}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class GGUFArch:
    hf_class: str                 # architectures[0] of the HF config
    model_type: str
    layers: dict[str, str]
    permute_qk: bool = False      # convert_hf_to_gguf permuted q/k rows (LLAMA_ROPE_TYPE_NORM)
    norm_shift: float = 0.0       # the converter stored every *norm.weight as w + norm_shift
    head_dim_from_rope: bool = False   # old files: rope.dimension_count stands for head_dim
    extra: Callable[[object, dict], None] = lambda m, cfg: None   # family-specific config


# ---- family-specific config (m: arch-prefixed metadata getter with .names and .tensor) ------
def _llama(m, cfg: dict) -> None:
    cfg.update(hidden_act="silu", attention_bias="blk.0.attn_q.bias" in m.names,
               mlp_bias="blk.0.ffn_up.bias" in m.names)
    window = m("attention.sliding_window")
    if window:
        # Mistral-7B-v0.1 style: llama architecture plus a window. HF's LlamaConfig has no
        # sliding window, MistralConfig has (convert_hf_to_gguf's LlamaModel, which converts
        # MistralForCausalLM, does not write the key; GGUFs that carry it get Mistral back)
        cfg.update(model_type="mistral", architectures=["MistralForCausalLM"],
                   sliding_window=int(window))


def _qwen2(m, cfg: dict) -> None:
    # Qwen2Model(TextModel) writes no window: HF Qwen2/2.5/3 configs run with it off
    cfg.update(hidden_act="silu", use_sliding_window=False, sliding_window=None)


def _qwen3(m, cfg: dict) -> None:
    _qwen2(m, cfg)
    cfg["attention_bias"] = "blk.0.attn_q.bias" in m.names


def _phi3(m, cfg: dict) -> None:
    """Phi3MiniModel.set_gguf_parameters: context_length = max_position_embeddings,
    rope.scaling.original_context_length = original_max_position_embeddings, rope.dimension_count
    = int(partial_rotary_factor * n_embd) // n_head, attention.sliding_window (0 for None);
    longrope (128k models) as rope_factors_long/short.weight tensors plus rope.scaling.attn_factor
    (no rope.scaling.type key is written)."""
    if "blk.0.attn_qkv.weight" not in m.names:
        raise ValueError("phi3 GGUF without fused blk.N.attn_qkv tensors is not supported")
    hd, n_ctx = cfg["head_dim"], cfg["max_position_embeddings"]
    orig = int(m("rope.scaling.original_context_length") or n_ctx)
    window = int(m("attention.sliding_window", 0) or 0)
    cfg.update(hidden_act="silu", original_max_position_embeddings=orig,
               sliding_window=window or None)   # llama.cpp runs Phi-3 without it; HF with it
    rot = int(m("rope.dimension_count") or hd)
    if rot != hd:
        cfg["partial_rotary_factor"] = rot / hd
    long, short = m.tensor("rope_factors_long.weight"), m.tensor("rope_factors_short.weight")
    if long is None or short is None:
        return
    sc = {"rope_type": "longrope", "long_factor": [float(x) for x in long.ravel()],
          "short_factor": [float(x) for x in short.ravel()]}
    # the converter stores sqrt(1 + ln(scale) / ln(orig)), which HF derives itself; keep only
    # a value that differs from it
    scale = n_ctx / orig
    default = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0
    attn = m("rope.scaling.attn_factor")
    if attn is not None and abs(float(attn) - default) > 1e-5:
        sc["attention_factor"] = float(attn)
    cfg["rope_scaling"] = sc


def _gemma2(m, cfg: dict) -> None:
    """Gemma2Model.set_gguf_parameters writes key_length = head_dim, the two soft-caps and
    attention.sliding_window, no rope.freq_base, no query_pre_attn_scalar. llama-model.cpp
    (LLM_ARCH_GEMMA2) defaults n_swa 4096 and the caps to 50 / 30 (llama-hparams.h), and scales
    queries by 1/sqrt(n_embd / n_head) for the 46-layer 27B, else 1/sqrt(n_embd_head_k): that
    is HF's query_pre_attn_scalar (144 for gemma-2-27b, head_dim 256 for 2B / 9B)."""
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    scalar = cfg["hidden_size"] // heads if layers == 46 else cfg["head_dim"]
    cfg.update(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
               attention_bias=False, query_pre_attn_scalar=scalar,
               attn_logit_softcapping=float(m("attn_logit_softcapping", 50.0)),
               final_logit_softcapping=float(m("final_logit_softcapping", 30.0)),
               sliding_window=int(m("attention.sliding_window", 4096)),
               tie_word_embeddings=True)   # llama.cpp always reads the head from token_embd


# llama.cpp's llama_model_rope_type: LLM_ARCH_LLAMA is LLAMA_ROPE_TYPE_NORM (interleaved pairs,
# hence LlamaModel.permute of q/k in the converter); QWEN2, QWEN3, PHI3 and GEMMA2 are
# LLAMA_ROPE_TYPE_NEOX, HF's own rotate-half layout, and their converters do not permute.
ARCHS = {
    "llama": GGUFArch("LlamaForCausalLM", "llama", LLAMA_LAYERS, permute_qk=True,
                      head_dim_from_rope=True, extra=_llama),
    "qwen2": GGUFArch("Qwen2ForCausalLM", "qwen2", LLAMA_LAYERS, extra=_qwen2),
    "qwen3": GGUFArch("Qwen3ForCausalLM", "qwen3", QWEN3_LAYERS, extra=_qwen3),
    "phi3": GGUFArch("Phi3ForCausalLM", "phi3", PHI3_LAYERS, extra=_phi3),
    # GemmaModel / Gemma2Model.modify_tensors: `if name.endswith("norm.weight"): data + 1`
    "gemma2": GGUFArch("Gemma2ForCausalLM", "gemma2", GEMMA2_LAYERS, norm_shift=1.0,
                       extra=_gemma2),
}


def gguf_arch(name: str) -> GGUFArch:
    if name not in ARCHS:
        raise ValueError(f"unsupported GGUF architecture {name!r}: flexrun reads "
                         f"{', '.join(ARCHS)} GGUF files (Llama, Mistral, SmolLM, Qwen2/2.5, "
                         "Qwen3, Phi-3, Gemma-2)")
    return ARCHS[name]
