"""Test helper: write a transformers model to GGUF the way llama.cpp's convert_hf_to_gguf.py does.

Per family, the metadata keys, tensor names (gguf-py's own TensorNameMap, which the converter's
map_tensor_name uses) and tensor transformations of the converter's model class
(conversion/llama.py, qwen.py, phi.py, gemma.py, base.py TextModel.set_gguf_parameters):

  llama, mistral  LlamaModel: q/k rows (weights and biases) permuted by LlamaModel.permute,
                  vocab_size and rope.dimension_count, Llama-3 scaling as rope_freqs.weight
  qwen2, qwen3    Qwen2Model / Qwen3Model: TextModel.set_gguf_parameters only, no permutation
  phi3            Phi3MiniModel: fused attn_qkv and ffn_up ([gate; up]) as HF has them, longrope
                  as rope_factors_long/short.weight plus rope.scaling.attn_factor
  gemma2          Gemma2Model: every *norm.weight stored + 1, no lm_head, soft-caps, window
  smollm3         SmolLM3Model: LlamaModel under its own arch (q/k permuted)
  granite         GraniteModel: LlamaModel (no head_dim) with its multipliers as *_scale
  gpt_oss         GptOssModel: experts de-interleaved and transposed into ffn_*_exps (MXFP4
                  with tensor_type "mxfp4", the rest F32), biases, attn_sinks.weight, yarn
  olmoe           OlmoeModel: TextModel keys (expert counts), experts stacked as Qwen's
  glm4_moe        Glm4MoeModel: experts stacked as Qwen's, shared ones ffn_*_shexp, the
                  router's e_score_correction_bias as exp_probs_b.bias, MoE keys, rope dims
  olmo2, olmo3    Olmo2Model (arch olmo2): TextModel keys, OLMo-3's window and per-layer
                  sliding_window_pattern
  gemma3_text     Gemma3Model: TextModel keys (the global layers' rope), norms + 1, window,
                  a final soft-cap only when the model has one
  mixtral         LlamaModel (arch llama): as llama, plus each layer's block_sparse_moe.experts.N
                  .w1 / w3 / w2 stacked as ffn_gate_exps / ffn_up_exps / ffn_down_exps, router
                  ffn_gate_inp, expert_count / expert_used_count (TextModel)
  qwen2_moe,      Qwen2MoeModel / Qwen3MoeModel: mlp.experts.N.gate_proj / up_proj / down_proj
  qwen3_moe       stacked as ffn_*_exps, router ffn_gate_inp, Qwen2-MoE's shared expert
                  ffn_*_shexp and gate ffn_gate_inp_shexp, expert_feed_forward_length and
                  expert_shared_feed_forward_length (no norm_topk_prob: llama.cpp renormalises
                  for qwen3moe, not for qwen2moe; a dense MLP layer has no GGUF name there)

One addition of ours: a Mistral config's sliding_window goes to llama.attention.sliding_window
(the converter does not write it; GGUFs from other tools do). 2-D tensors are F32, F16 or Q8_0
(`tensor_type`; Q8_0 falls back to F16 where rows are not whole blocks of 32, as the converter
does on gguf.QuantError), 1-D tensors and the MoE gates (ffn_gate_inp, ffn_gate_inp_shexp)
stay F32 as the converter keeps them. MoE models are read as their checkpoint holds them
(save_pretrained's per-expert names), as the converter reads them.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q, LlamaFileType as FT, MODEL_ARCH as A

from gguf_metadata import METADATA

ARCH = {"llama": A.LLAMA, "mistral": A.LLAMA, "qwen2": A.QWEN2, "qwen3": A.QWEN3,
        "phi3": A.PHI3, "gemma2": A.GEMMA2, "gemma3_text": A.GEMMA3, "smollm3": A.SMOLLM3,
        "olmo2": A.OLMO2, "olmo3": A.OLMO2, "glm4_moe": A.GLM4_MOE, "olmoe": A.OLMOE,
        "gpt_oss": A.GPT_OSS, "granite": A.GRANITE, "mixtral": A.LLAMA,
        "qwen2_moe": A.QWEN2MOE, "qwen3_moe": A.QWEN3MOE, "llama4_text": A.LLAMA4}
GEMMAS = ("gemma2", "gemma3_text")
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight")
TYPES = {"f32": (Q.F32, FT.ALL_F32), "f16": (Q.F16, FT.MOSTLY_F16),
         "q8_0": (Q.Q8_0, FT.MOSTLY_Q8_0),
         "mxfp4": (Q.MXFP4, FT.MOSTLY_MXFP4_MOE)}   # gpt-oss: experts MXFP4, the rest F32


def write_gguf_like_llama_cpp(hf_model, path, tokenizer_dir=None, *,
                              tensor_type: str = "f32") -> Path:
    """Write `hf_model` (Llama, Mistral, Mixtral, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE, Phi3,
    Gemma2, Gemma3, SmolLM3, Olmo2 or Olmo3 ForCausalLM) to `path`.

    tokenizer_dir: a directory with a byte-level BPE tokenizer.json (e.g. conftest's
    make_tokenizer), embedded as llama.cpp's "gpt2" vocabulary; without it the file holds only
    the special token ids (flexrun's gguf_tokenizer then gives None)."""
    cfg = hf_model.config
    family = cfg.model_type
    if family not in ARCH:
        raise ValueError(f"no llama.cpp-style GGUF writer for model_type {family!r}")
    hp = cfg.to_dict()
    rope = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    rope = dict(rope.get("full_attention", rope))     # Gemma-3: its global layers' rope
    path = Path(path)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[ARCH[family]])
    extra = METADATA[family](w, hp, rope)
    w.add_file_type(TYPES[tensor_type][1])
    names = gguf.get_tensor_name_map(ARCH[family], hp["num_hidden_layers"])
    heads, kv_heads = hp["num_attention_heads"], hp["num_key_value_heads"]
    tensors = checkpoint_tensors(hf_model)
    if family == "gpt_oss":
        tensors = _gpt_oss_tensors(tensors)
    if family == "llama4_text":
        tensors = _llama4_tensors(tensors)
    for name, t in _stack_experts(tensors):
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")  # GLM-4.5
        if name == "lm_head.weight" and (hp.get("tie_word_embeddings") or family in GEMMAS):
            continue                      # tied: not in the safetensors; Gemma2Model skips it
        data = t.detach().to(torch.float32).numpy()
        if family in ("llama", "mistral", "mixtral", "smollm3", "granite"):
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute(data, heads)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute(data, kv_heads)
        if family in GEMMAS and name.endswith("norm.weight"):
            data = data + 1
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"no GGUF name for {name}")
        if gname.endswith("attn_sinks"):          # GptOssModel: sinks += ".weight"
            gname += ".weight"
        _add(w, gname, data, tensor_type)
    for gname, data in extra:
        w.add_tensor(gname, np.asarray(data, dtype=np.float32))
    _vocab(w, hp, tokenizer_dir)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _gpt_oss_tensors(tensors: dict) -> dict:
    """GptOssModel.modify_tensors on unquantized experts: gate_up_proj (E, hidden, 2 ffn)
    transposed and de-interleaved into gate (rows 0::2) and up (1::2), biases alike,
    down_proj transposed: stacked experts the name map knows."""
    out = {}
    for name, t in tensors.items():
        base = name.rsplit(".", 1)[0] + "."
        if name.endswith("experts.gate_up_proj"):
            t = t.transpose(1, 2)
            out[base + "gate_proj.weight"], out[base + "up_proj.weight"] = t[:, 0::2], t[:, 1::2]
        elif name.endswith("experts.gate_up_proj_bias"):
            out[base + "gate_proj.bias"], out[base + "up_proj.bias"] = t[:, 0::2], t[:, 1::2]
        elif name.endswith("experts.down_proj"):
            out[base + "down_proj.weight"] = t.transpose(1, 2)
        elif name.endswith("experts.down_proj_bias"):
            out[base + "down_proj.bias"] = t
        else:
            out[name] = t
    return {n: t.contiguous() for n, t in out.items()}


def _llama4_tensors(tensors: dict) -> dict:
    """Llama4Model.modify_tensors: gate_up_proj (E, hidden, 2 ffn) transposed and split into
    gate and up (E, ffn, hidden), down_proj (E, ffn, hidden) transposed: the stacks the name
    map knows (feed_forward.experts.gate_proj / up_proj / down_proj)."""
    out = {}
    for name, t in tensors.items():
        base = name.rsplit(".", 1)[0] + "."
        if name.endswith("experts.gate_up_proj"):
            gate, up = t.transpose(-1, -2).split(t.shape[-1] // 2, dim=-2)
            out[base + "gate_proj.weight"], out[base + "up_proj.weight"] = gate, up
        elif name.endswith("experts.down_proj"):
            out[base + "down_proj.weight"] = t.transpose(-1, -2)
        else:
            out[name] = t
    return {n: t.contiguous() for n, t in out.items()}


def checkpoint_tensors(hf_model) -> dict[str, torch.Tensor]:
    """The tensors as the model's checkpoint holds them: the state dict, or for a mixture of
    experts what save_pretrained writes (transformers 5 keeps each layer's experts fused in
    memory, gate_up_proj / down_proj, and saves them per expert)."""
    if not hf_model.config.to_dict().get("num_experts_per_tok"):
        return hf_model.state_dict()
    from safetensors.torch import load_file
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d, safe_serialization=True)
        return load_file(str(Path(d) / "model.safetensors"))


def _stack_experts(tensors: dict):
    """(name, tensor) with each layer's experts stacked along a new first dim as the converter
    does (LlamaModel / Qwen2MoeModel.modify_tensors), under the names it maps."""
    experts: dict[tuple, dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _EXPERT.fullmatch(name)
        if m is None:
            yield name, t
            continue
        experts.setdefault((int(m.group(1)), m.group(2), m.group(4)), {})[int(m.group(3))] = t
    for (layer, block, part), by_id in sorted(experts.items()):
        stacked = torch.stack([by_id[e] for e in range(len(by_id))])
        if block == "block_sparse_moe":       # LlamaModel: layers.N.feed_forward.experts.w1
            yield f"layers.{layer}.feed_forward.experts.{part}.weight", stacked
        else:
            yield f"model.layers.{layer}.mlp.experts.{part}.weight", stacked


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """LlamaModel.permute: HF rotate-half q/k rows -> llama.cpp's interleaved pairs."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def stored_type(shape, tensor_type: str, name: str = "") -> Q:
    """The GGML type a tensor of this HF shape (and HF or GGUF name) is written as."""
    qtype = TYPES[tensor_type][0]
    if qtype == Q.MXFP4:                # gpt-oss's converter: only the experts' weights
        exps = "_exps.weight" in name or ".experts." in name and name.endswith("proj.weight")
        return Q.MXFP4 if exps and len(shape) > 1 else Q.F32
    if len(shape) <= 1 or name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight",
                                         "shared_expert_gate.weight", "ffn_gate_inp.weight",
                                         "ffn_gate_inp_shexp.weight")):
        return Q.F32
    if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return qtype


def stored_value(arr: np.ndarray, tensor_type: str, name: str = "") -> np.ndarray:
    """What reading the tensor back gives: `arr` (f32, HF layout) after the write's rounding."""
    from gguf.quants import dequantize, quantize
    arr = np.asarray(arr, dtype=np.float32)
    q = stored_type(arr.shape, tensor_type, name)
    if q == Q.F32:
        return arr
    if q == Q.F16:
        return arr.astype(np.float16).astype(np.float32)
    return dequantize(quantize(arr, q), q).reshape(arr.shape)   # row blocks: layout-independent


def _add(w, gname: str, data: np.ndarray, tensor_type: str) -> None:
    from gguf.quants import quantize
    q = stored_type(data.shape, tensor_type, gname)
    if q == Q.F32:
        w.add_tensor(gname, data.astype(np.float32))
    elif q == Q.F16:
        w.add_tensor(gname, data.astype(np.float16))
    else:
        w.add_tensor(gname, quantize(data.astype(np.float32), q), raw_dtype=q)


# ---- vocabulary -----------------------------------------------------------------------------
def _vocab(w, hp: dict, tokenizer_dir) -> None:
    """_set_vocab_gpt2 from a byte-level BPE tokenizer.json (tokens padded to vocab_size with
    [PAD{i}] UNUSED entries, added tokens CONTROL or USER_DEFINED) and the special ids."""
    if tokenizer_dir is not None:
        tj = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = dict(tj["model"]["vocab"])
        added = {a["id"]: a for a in tj.get("added_tokens", [])}
        vocab.update({a["content"]: i for i, a in added.items()})
        by_id = {i: t for t, i in vocab.items()}
        n = max(hp["vocab_size"], max(by_id) + 1)
        tokens, types = [], []
        for i in range(n):
            if i not in by_id:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            else:
                tokens.append(by_id[i])
                types.append(gguf.TokenType.NORMAL if i not in added else
                             gguf.TokenType.CONTROL if added[i]["special"] else
                             gguf.TokenType.USER_DEFINED)
        merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        single = (tj.get("post_processor") or {}).get("single") or [{}]
        w.add_add_bos_token("SpecialToken" in single[0])
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("pad_token_id", w.add_pad_token_id)):
        tid = hp.get(key)
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if tid is not None and 0 <= tid < hp["vocab_size"]:
            add(tid)
