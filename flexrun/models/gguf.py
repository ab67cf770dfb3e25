"""Read llama.cpp GGUF files as HF checkpoints: config dict, dequantized HF tensors, tokenizer.

Architectures llama (Llama, Mistral, Mixtral, SmolLM), smollm3, granite, olmo2, qwen2, qwen3,
qwen2moe, qwen3moe, olmoe, glm4moe, gpt-oss, phi3, gemma2 and gemma3; what differs between them
is in gguf_arch.py. Only gguf, numpy, torch and tokenizers are used. Tensors are memory-mapped
by gguf.GGUFReader and dequantized one at a time (stacked experts one expert at a time), so the
model is never held twice.
"""
from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import torch

from flexrun.models.rope import interleaved_to_halves
from flexrun.models.gguf_arch import TOP_NAMES, GGUFArch, gguf_arch

PathLike = str | os.PathLike

_BLK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@functools.lru_cache(maxsize=2)
def _open(path: str, mtime_ns: int):
    import gguf
    return gguf.GGUFReader(path)


def _reader(path: PathLike):
    """A (cached) memory-mapped GGUFReader; parsing the metadata of a big vocab takes a second."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file {p} not found")
    try:
        return _open(str(p.resolve()), p.stat().st_mtime_ns)
    except (ValueError, OSError) as e:
        raise ValueError(f"{p.name} is not a readable GGUF file ({e})") from e


def release_readers() -> None:
    """Forget the cached readers (their memory maps and parsed metadata)."""
    _open.cache_clear()


def _meta(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _uniform(value, what: str) -> int:
    """A per-layer list must hold one value throughout (flexrun has no per-layer shapes)."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"per-layer {what} {sorted(set(value))} is not supported")
        value = value[0]
    return int(value)


# ---- config ---------------------------------------------------------------------------------
class _Meta:
    """`{arch}.`-prefixed metadata of one GGUF, its tensor names and small tensors by name."""

    def __init__(self, r, arch: str):
        self.r, self.arch = r, arch
        self.names = {t.name for t in r.tensors}

    def __call__(self, key: str, default=None):
        return _meta(self.r, f"{self.arch}.{key}", default)

    def tensor(self, name: str) -> np.ndarray | None:
        t = next((t for t in self.r.tensors if t.name == name), None)
        return None if t is None else _dequantize(t)


def _architecture(r) -> tuple[str, GGUFArch]:
    """(general.architecture, what flexrun knows of it)."""
    name = _meta(r, "general.architecture", "unknown")
    return name, gguf_arch(name)


def gguf_config(path: PathLike) -> dict:
    """The HF config.json dict (LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config,
    Qwen3Config, Qwen2MoeConfig, Qwen3MoeConfig, Phi3Config, Gemma2Config, Gemma3TextConfig or
    SmolLM3Config style) built from the GGUF metadata."""
    r = _reader(path)
    name, fam = _architecture(r)
    key = _Meta(r, name)
    missing = [k for k in ("embedding_length", "block_count", "attention.head_count",
                           "feed_forward_length") if key(k) is None]
    if missing:
        raise ValueError(f"GGUF metadata lacks {key.arch}.{missing[0]}: the file is incomplete")
    hidden, heads = int(key("embedding_length")), _uniform(key("attention.head_count"), "heads")
    kv_heads = _uniform(key("attention.head_count_kv", heads), "kv heads")
    head_dim = int(key("attention.key_length")
                   or (fam.head_dim_from_rope and key("rope.dimension_count"))
                   or hidden // heads)
    theta = float(key("rope.freq_base", 10000.0))
    tokens = r.fields.get("tokenizer.ggml.tokens")
    embd = next((t for t in r.tensors if t.name == "token_embd.weight"), None)
    vocab = (int(embd.shape[1]) if embd is not None       # GGUF dims are [hidden, vocab]
             else key("vocab_size") or (len(tokens.data) if tokens is not None else None))
    if vocab is None:
        raise ValueError("GGUF has neither a vocabulary size nor a token_embd.weight tensor")
    eos = [_meta(r, f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id",
                                                      "eom_token_id")]
    eos = list(dict.fromkeys(int(e) for e in eos if e is not None))
    cfg = {
        "model_type": fam.model_type, "architectures": [fam.hf_class],
        "vocab_size": int(vocab), "hidden_size": hidden,
        "intermediate_size": _uniform(key("feed_forward_length"), "feed_forward_length"),
        "num_hidden_layers": int(key("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "max_position_embeddings": int(key("context_length", 4096)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta, "rope_scaling": _rope_scaling(r, key.arch, head_dim, theta),
        "tie_word_embeddings": "output.weight" not in key.names,
        "bos_token_id": _meta(r, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
    }
    pad = _meta(r, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        cfg["pad_token_id"] = int(pad)
    fam.extra(key, cfg)
    return cfg


def _rope_scaling(r, arch: str, head_dim: int, theta: float) -> dict | None:
    """HF rope_scaling from `{arch}.rope.scaling.*` (or scale_linear), or llama3 from rope_freqs."""
    kind = _meta(r, f"{arch}.rope.scaling.type")
    factor = _meta(r, f"{arch}.rope.scaling.factor")
    if kind is None and _meta(r, f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", _meta(r, f"{arch}.rope.scale_linear")
    if kind not in (None, "none") and factor is not None and float(factor) != 1.0:
        sc = {"rope_type": kind, "factor": float(factor)}
        orig = _meta(r, f"{arch}.rope.scaling.original_context_length")
        if orig:
            sc["original_max_position_embeddings"] = int(orig)
        # TextModel.set_gguf_parameters (yarn): rope.scaling.yarn_attn_factor / yarn_beta_fast /
        # yarn_beta_slow from HF's attention_factor / beta_fast / beta_slow
        for k, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                      ("yarn_attn_factor", "attention_factor"),
                      ("attn_factor", "attention_factor")):
            v = _meta(r, f"{arch}.rope.scaling.{k}")
            if v is not None and hf not in sc:
                sc[hf] = float(v)
        return sc
    freqs = next((t for t in r.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        return None
    return _llama3_from_factors(np.asarray(freqs.data, dtype=np.float64).ravel(), head_dim, theta)


def _llama3_from_factors(factors: np.ndarray, head_dim: int, theta: float) -> dict | None:
    """Recover Llama-3 rope_scaling from llama.cpp's per-frequency divisors (rope_freqs.weight)."""
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    # the original context: the usual ones first, then any power of two from 16 to 2^20
    for old in dict.fromkeys((8192, 4096, 2048, 16384, 32768, 65536, 131072,
                              *(2 ** i for i in range(4, 21)))):
        for lo, hi in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0), (2.0, 8.0)):
            smooth = (old / wavelen - lo) / (hi - lo)
            want = np.where(wavelen < old / hi, 1.0, np.where(
                wavelen > old / lo, factor, 1.0 / ((1 - smooth) / factor + smooth)))
            if want.shape == factors.shape and np.allclose(want, factors, rtol=1e-4):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": lo,
                        "high_freq_factor": hi, "original_max_position_embeddings": old}
    raise ValueError("rope_freqs.weight holds rope factors that match no Llama-3 rope_scaling: "
                     "this GGUF's rope scaling is not supported")


# ---- tensors --------------------------------------------------------------------------------
def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The HF state-dict name of a GGUF tensor of architecture `arch` (general.architecture;
    None: not a model weight, e.g. rope_freqs). Stacked experts name one expert, "{e}"."""
    m = _BLK_RE.fullmatch(gguf_name)
    if m:
        sub = gguf_arch(arch).layers.get(m.group(2))
        if sub == "mlp.gate.e_score_correction":     # GLM-4.5: HF's name has no dot
            return f"model.layers.{m.group(1)}.{sub}_{m.group(3)}"
        return f"model.layers.{m.group(1)}.{sub}.{m.group(3)}" if sub else None
    base, _, kind = gguf_name.rpartition(".")
    return f"{TOP_NAMES[base]}.{kind}" if base in TOP_NAMES else None


def _dequantize(t, index: int | None = None) -> np.ndarray:
    """The tensor in HF shape (GGUF lists dims innermost-first), or its `index`-th slice along
    the outermost dim (one expert of a stacked tensor: only that slice is read)."""
    from gguf.quants import dequantize
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    data = t.data if index is None else t.data[index]
    w = dequantize(data, t.tensor_type).reshape(shape if index is None else shape[1:])
    return w if w.flags.writeable else w.copy()                  # never hand out the memmap


@dataclass
class TensorIndex:
    """What reading a GGUF's tensors takes, without the reader's parsed metadata (a big
    vocabulary parses into ~180 MiB of Python objects): each tensor's name, type, shape and
    memory-mapped data, the architecture and the config values the conversion needs."""
    arch: str
    family: GGUFArch
    heads: dict[str, int]
    tied: bool
    tensors: list[SimpleNamespace]


def tensor_index(path: PathLike, cfg: dict | None = None) -> TensorIndex:
    """The file's TensorIndex; cfg: its gguf_config when already read."""
    cfg = cfg or gguf_config(path)
    r = _reader(path)
    arch, fam = _architecture(r)
    return TensorIndex(arch, fam, {"q_proj": cfg["num_attention_heads"],
                                   "k_proj": cfg["num_key_value_heads"]},
                       bool(cfg["tie_word_embeddings"]),
                       [SimpleNamespace(name=t.name, tensor_type=t.tensor_type, shape=t.shape,
                                        data=t.data) for t in r.tensors])


def iter_gguf_tensors(path: PathLike, dtype: torch.dtype = torch.float32,
                      index: TensorIndex | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, dequantized tensor in HF shape and layout) one tensor at a time; a
    layer's stacked experts one expert at a time (HF's per-expert names). index: the file's
    tensor_index, taken before its reader was released."""
    ix = index or tensor_index(path)
    gates: dict[str, torch.Tensor] = {}     # Llama 4: a layer's gate stack until its up one
    for t in ix.tensors:
        name = hf_tensor_name(t.name, ix.arch)
        if name is None or (name == "lm_head.weight" and ix.tied):
            continue
        if ix.family.hf_stacked_experts and ".experts." in name:
            yield from _hf_stacked(name, torch.from_numpy(_dequantize(t)), gates, dtype)
            continue
        if "{e}" in name:
            for e in range(int(t.shape[-1])):
                yield name.format(e=e), torch.from_numpy(_dequantize(t, e)).to(dtype)
            continue
        w = torch.from_numpy(_dequantize(t))
        if name.endswith("shared_expert_gate.weight"):
            w = w.reshape(1, -1)         # (1, hidden), also when written 1-D
        proj = name.split(".")[-2]
        if ix.family.permute_qk and proj in ix.heads and ".self_attn." in name:
            w = interleaved_to_halves(w, ix.heads[proj])
        if ix.family.norm_shift and name.endswith("norm.weight"):
            w -= ix.family.norm_shift    # Gemma: the converter stored w + 1
        yield name, w.to(dtype).contiguous()


def _hf_stacked(name: str, w: torch.Tensor, gates: dict, dtype: torch.dtype
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """Llama 4's experts as its checkpoint stacks them: gate_up_proj (E, hidden, 2 ffn), gate
    then up along the columns, from the (E, ffn, hidden) gate and up stacks (Llama4Model split
    and transposed it); down_proj (E, ffn, hidden) from the (E, hidden, ffn) stack."""
    base, _, part = name.removesuffix(".weight").rpartition(".")
    if part == "down_proj":
        yield f"{base}.down_proj", w.transpose(1, 2).to(dtype).contiguous()
        return
    other = "up_proj" if part == "gate_proj" else "gate_proj"
    if base + other not in gates:
        gates[base + part] = w
        return
    pair = {part: w, other: gates.pop(base + other)}
    gate_up = torch.cat([pair["gate_proj"], pair["up_proj"]], 1).transpose(1, 2)
    yield f"{base}.gate_up_proj", gate_up.to(dtype).contiguous()


def native_q4_group(path: PathLike) -> int | None:
    """32 when every linear weight of the blocks is Q4_0 or Q4_1 (blocks of 32 values, one
    min/scale each), else None. compress_weight with groups of 32 then re-encodes each block
    as itself, with no second rounding, whenever the block spans its 16 levels (Q4_1 blocks
    written by llama.cpp do; see docs/accuracy.md)."""
    from gguf import GGMLQuantizationType as Q
    kinds = {t.tensor_type for t in _reader(path).tensors      # experts too; not the routers
             if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) >= 2
             and "ffn_gate_inp" not in t.name}                  # (kept F32, dense in flexrun)
    return 32 if kinds and kinds <= {Q.Q4_0, Q.Q4_1} else None
