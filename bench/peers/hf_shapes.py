"""transformers models of flexrun's dummy shapes, filled with flexrun's synthetic weights.

hf_config turns a ModelSpec into the matching transformers config (OPTConfig, LlamaConfig,
MistralConfig, Qwen2/3Config, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig: same shapes, same
token ids). materialize puts flexrun's values (models.dummy.synthetic_tensor under the names
models.loader.canonical_name gives) into an empty model where a device map says. transformers
5 stores each layer's experts stacked (`experts.gate_up_proj` (E, 2 * ffn, hidden) holding
[gate; up] per expert, `experts.down_proj` (E, hidden, ffn)); those are built from flexrun's
per-expert tensors `layers.{i}.experts.{e}.gate/up/down.weight`. Older transformers' per-expert
modules (`block_sparse_moe.experts.{e}.w1` ...) map name for name.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from flexrun.models.dummy import synthetic_tensor
from flexrun.models.loader import canonical_name
from flexrun.models.spec import ModelSpec

# the Llama-style families the peer builds (phi3's fused qkv and gemma2 are not peer shapes)
PEER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")


def _opt_config(spec: ModelSpec):
    from transformers import OPTConfig
    return OPTConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                     num_hidden_layers=spec.num_layers, ffn_dim=spec.ffn_dim,
                     num_attention_heads=spec.num_heads, max_position_embeddings=spec.max_positions,
                     do_layer_norm_before=spec.do_layer_norm_before,
                     word_embed_proj_dim=spec.embed_dim,
                     _remove_final_layer_norm=not spec.final_layer_norm,
                     pad_token_id=spec.pad_token_id, bos_token_id=spec.bos_token_id,
                     eos_token_id=spec.eos_token_ids[0], dropout=0.0, tie_word_embeddings=True)


def _moe_kwargs(spec: ModelSpec, family: str) -> dict:
    if family == "mixtral":
        return dict(num_local_experts=spec.num_experts,
                    num_experts_per_tok=spec.experts_per_token,
                    intermediate_size=spec.expert_ffn_dim)
    kw = dict(num_experts=spec.num_experts, num_experts_per_tok=spec.experts_per_token,
              moe_intermediate_size=spec.expert_ffn_dim, norm_topk_prob=spec.norm_topk_prob,
              decoder_sparse_step=1,
              mlp_only_layers=[i for i in range(spec.num_layers) if not spec.is_moe(i)])
    if family == "qwen2_moe":
        kw.update(shared_expert_intermediate_size=spec.shared_expert_ffn_dim,
                  qkv_bias=spec.qkv_bias)
    return kw


def hf_config(spec: ModelSpec):
    """The transformers config of a flexrun spec (same shape, same token ids)."""
    if spec.arch == "opt":
        return _opt_config(spec)
    from transformers import AutoConfig
    family = spec.family or "llama"
    if family not in PEER_FAMILIES:
        raise SystemExit(f"the Accelerate peer runs {', '.join(PEER_FAMILIES)} and opt shapes, "
                         f"not {family}")
    if spec.rope_scaling is not None:
        raise SystemExit("the Accelerate peer runs default RoPE only")
    if spec.sliding_window is not None and spec.window_layers is not None:
        raise SystemExit("the Accelerate peer runs no per-layer sliding windows")
    eos = spec.eos_token_ids
    kw = dict(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
              num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
              num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
              intermediate_size=spec.ffn_dim, max_position_embeddings=spec.max_positions,
              rms_norm_eps=spec.norm_eps, hidden_act="silu",
              rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
              tie_word_embeddings=spec.tie_word_embeddings, bos_token_id=spec.bos_token_id,
              eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
              pad_token_id=spec.pad_token_id, attention_dropout=0.0)
    if family == "llama":
        kw.update(attention_bias=spec.attention_bias, mlp_bias=spec.mlp_bias)
    if family in ("mistral", "mixtral"):
        kw["sliding_window"] = spec.sliding_window
    if family.startswith("qwen"):
        kw.update(use_sliding_window=spec.sliding_window is not None,
                  sliding_window=spec.sliding_window)
    if spec.num_experts:
        kw.update(_moe_kwargs(spec, family))
    return AutoConfig.for_model(family, **kw)


def tied_names(model: torch.nn.Module) -> set[str]:
    """The model's parameters that share the embedding (none when the config unties them)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return set(getattr(model, "_tied_weights_keys", None) or ["lm_head.weight"])


def synthetic_value(spec: ModelSpec, hf_name: str, shape: tuple[int, ...],
                    tied: bool = False) -> torch.Tensor:
    """flexrun's synthetic value (fp16, CPU) of the HF parameter `hf_name`: the tensor of the
    same canonical name, or the stack of the per-expert tensors a stacked expert tensor holds."""
    name = "embed.tokens" if tied else canonical_name(spec, hf_name)
    if name is None:
        raise KeyError(f"{hf_name}: no flexrun weight of that name")
    cpu = torch.device("cpu")
    prefix, _, kind = name.rpartition(".")            # layers.3.experts.gate_up, weight
    stacked, _, part = prefix.rpartition(".")
    if stacked.endswith(".experts") and part in ("gate_up", "down"):
        parts = ("gate", "up") if part == "gate_up" else ("down",)
        per, out = shape[1] // len(parts), torch.empty(shape, dtype=torch.float16)
        for e in range(shape[0]):
            for j, p in enumerate(parts):
                out[e, j * per:(j + 1) * per] = synthetic_tensor(
                    f"{stacked}.{e}.{p}.{kind}", (per, shape[2]), cpu)
        return out
    want = spec.all_shapes().get(name)
    if want is None or tuple(want) != tuple(shape):
        raise KeyError(f"{hf_name} -> {name}: flexrun has shape {want}, HF {tuple(shape)}")
    return synthetic_tensor(name, tuple(shape), cpu)


def device_of(device_map: dict, hf_name: str):
    """Where the device map puts a parameter: its longest module prefix decides."""
    dev, best = device_map.get(""), -1
    for mod, d in device_map.items():
        if mod and len(mod) > best and (hf_name == mod or hf_name.startswith(mod + ".")):
            dev, best = d, len(mod)
    return dev


def device_kind(d) -> str:
    return "gpu" if isinstance(d, int) or str(d).startswith("cuda") else str(d)


def materialize(model: torch.nn.Module, spec: ModelSpec, device_map: dict, offload_dir: Path,
                dtype: torch.dtype) -> dict[str, int]:
    """Fill the empty model with flexrun's synthetic weights (same names, same values) where
    the device map puts them: GPU / CPU tensors in place, disk ones written one at a time to
    accelerate's offload folder (index.json + .dat memmaps), the state that
    `load_checkpoint_and_dispatch(..., offload_folder=...)` leaves. Never holds the model.
    Returns the weight bytes per device kind (gpu / cpu / disk)."""
    from accelerate.utils import offload_weight, save_offload_index, set_module_tensor_to_device
    index: dict = {}
    placed: Counter = Counter()
    tied = tied_names(model)
    for hf_name, p in model.state_dict(keep_vars=True).items():
        if not isinstance(p, torch.nn.Parameter) and canonical_name(spec, hf_name) is None:
            continue                          # a buffer (rotary frequencies ...)
        dev = device_of(device_map, hf_name)
        if hf_name in tied and dev != "disk":
            continue                          # tie_weights() below shares the embedding
        t = synthetic_value(spec, hf_name, tuple(p.shape), hf_name in tied).to(dtype)
        if dev == "disk":                     # a tied copy on disk is a second file
            index = offload_weight(t, hf_name, str(offload_dir), index=index)
        else:
            set_module_tensor_to_device(model, hf_name, dev, value=t)
        placed[device_kind(dev)] += t.numel() * t.element_size()
        del t
    save_offload_index(index, str(offload_dir))
    model.tie_weights()
    return dict(placed)
