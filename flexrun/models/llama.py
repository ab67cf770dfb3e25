"""Llama-family layers (RMSNorm, RoPE, GQA, SwiGLU) as functions of handed-in weights."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flexrun.config import FlexrunError
from flexrun.models.common import add_norm, dense, linear, linear_rows, rms_norm, split_heads
from flexrun.models.spec import ModelSpec


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """Inverse frequencies, with Llama-3 or linear rope_scaling applied when configured."""
    hd = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    sc = spec.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(sc["factor"])
    if kind == "llama3":
        factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled)
    raise FlexrunError(f"rope_scaling type {kind!r} is not supported (use default, linear or llama3)")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (b, s, heads, hd); cos/sin: (b, s, 1, hd). HF's rotate-half convention."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class LlamaModel:
    """Math of one Llama unit at a time; weights come in as dicts of tensors."""
    JOINED = (("q", "k", "v"), ("gate", "up"))  # multiplied as one (TieredStore.join)

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.inv_freq = rope_inv_freq(spec)
        self._inv_on: dict[torch.device, torch.Tensor] = {}

    def _cos_sin(self, positions: torch.Tensor, dtype):
        dev = positions.device
        inv = self._inv_on.get(dev)
        if inv is None:
            inv = self._inv_on[dev] = self.inv_freq.to(dev)
        freqs = positions.float()[..., None] * inv           # (b, s, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def embed(self, w: dict, ids: torch.Tensor, positions: torch.Tensor, dtype) -> torch.Tensor:
        return dense(w["embed.tokens"])[ids].to(dtype)

    def pre_attn(self, w: dict, h: torch.Tensor, positions: torch.Tensor):
        s = self.spec
        x = rms_norm(h, w["attn_norm.weight"], s.norm_eps)
        q, k, v = linear_rows(x, [w["q.weight"], w["k.weight"], w["v.weight"]],
                              [w.get("q.bias"), w.get("k.bias"), w.get("v.bias")])
        q, k, v = (split_heads(q, s.num_heads), split_heads(k, s.num_kv_heads),
                   split_heads(v, s.num_kv_heads))
        cos, sin = self._cos_sin(positions, h.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def post_attn(self, w: dict, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        s = self.spec
        h, x = add_norm(h, linear(attn, w["o.weight"], w.get("o.bias")), w["mlp_norm.weight"],
                        None, s.norm_eps, True)
        g, up = linear_rows(x, [w["gate.weight"], w["up.weight"]],
                            [w.get("gate.bias"), w.get("up.bias")])
        g = F.silu(g, inplace=True).mul_(up)            # in place: 2 (b, s, ffn) live
        x = linear(g, w["down.weight"], w.get("down.bias"))
        return h + x

    def head(self, w: dict, h: torch.Tensor) -> torch.Tensor:
        s = self.spec
        h = rms_norm(h, w["head.norm.weight"], s.norm_eps)
        lm = w["embed.tokens"] if s.tie_word_embeddings else w["head.lm_head"]
        return linear(h, lm)


def model_for(spec: ModelSpec):
    """The math object for a spec's architecture."""
    from flexrun.models.opt import OPTModel
    return OPTModel(spec) if spec.arch == "opt" else LlamaModel(spec)
