"""Llama-style decoders as functions of handed-in weights: Llama 2/3, Mistral, Qwen2/2.5,
Qwen3, Phi-3, Gemma-2, Gemma-3, SmolLM3, Mixtral, Qwen2-MoE and Qwen3-MoE are one decoder with
flags (ModelSpec): RMSNorm (Gemma: 1 + weight), RoPE (rope.py; Gemma-3's sliding layers their
own, SmolLM3's NoPE layers none), GQA with optional q/k/v biases and per-head q/k norms, a
gated MLP (SiLU or tanh-GELU) or a mixture of experts (moe.py), Gemma's sandwich norms, scaled
embeddings and logit soft-capping."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from flexrun.models.opt import OPTModel
from flexrun.models.common import add_norm, dense, linear, linear_rows, rms_norm, split_heads
from flexrun.models.moe import MoEStats, moe_mlp
from flexrun.models.rope import Rope, apply_rope
from flexrun.models.spec import ModelSpec


class LlamaModel:
    """Math of one Llama-style unit at a time; weights come in as dicts of tensors."""
    JOINED = (("q", "k", "v"), ("gate", "up"))  # multiplied as one (TieredStore.join)

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.rope = Rope(spec)
        self.local_rope = None if spec.local_rope_theta is None else Rope(dataclasses.replace(
            spec, rope_theta=spec.local_rope_theta, rope_scaling=spec.local_rope_scaling))
        self.moe_stats = MoEStats(spec.routing, spec.num_layers) if spec.num_experts else None
        E = spec.num_experts
        self.JOINED = self.JOINED + tuple((f"experts.{e}.gate", f"experts.{e}.up")
                                          for e in range(E))
        if E:   # then a layer's experts back to back, when all are resident: grouped GEMMs
            self.JOINED += (tuple(f"experts.{e}.{p}" for e in range(E) for p in ("gate", "up")),
                            tuple(f"experts.{e}.down" for e in range(E)))
        if spec.shared_expert_ffn_dim:
            self.JOINED += (("shared.gate", "shared.up"),)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if not s.norm_offset and not s.norm_fp32_scale:
            return rms_norm(x, weight, s.norm_eps)
        # Gemma: x * (1 + w), all in fp32, then cast (OLMo-2: w)
        return (_rms_fp32(x, s.norm_eps) * (s.norm_offset + weight.float())).to(x.dtype)

    def _add_norm(self, h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None):
        """(h + y, its norm); weight None (no pre-norms): (h + y, h + y)."""
        if weight is None:
            h = h + y
            return h, h
        if not self.spec.norm_offset and not self.spec.norm_fp32_scale:
            return add_norm(h, y, weight, None, self.spec.norm_eps, True)
        h = h + y
        return h, self._norm(h, weight)

    def embed(self, w: dict, ids: torch.Tensor, positions: torch.Tensor, dtype) -> torch.Tensor:
        x = dense(w["embed.tokens"])[ids].to(dtype)
        if self.spec.embed_scale:       # the normalizer is rounded to the run's dtype, as in HF
            x = x * torch.tensor(self.spec.hidden_size ** 0.5, dtype=dtype)
        if self.spec.embed_multiplier != 1.0:
            x = x * self.spec.embed_multiplier
        return x

    def pre_attn(self, w: dict, h: torch.Tensor, positions: torch.Tensor,
                 layer: int | None = None, rope_cache: dict | None = None):
        """Normed input -> q, k, v (b, s, heads, hd), rotated for decoder layer `layer`;
        rope_cache: the RoPE tables of `positions` kept across the layers of one step."""
        s = self.spec
        x = self._norm(h, w["attn_norm.weight"]) if s.pre_norms else h
        q, k, v = linear_rows(x, [w["q.weight"], w["k.weight"], w["v.weight"]],
                              [w.get("q.bias"), w.get("k.bias"), w.get("v.bias")])
        if s.qk_norm_whole:
            q, k = self._norm(q, w["q_norm.weight"]), self._norm(k, w["k_norm.weight"])
        if s.clip_qkv is not None:
            q, k, v = (t.clamp(-s.clip_qkv, s.clip_qkv) for t in (q, k, v))
        q, k, v = (split_heads(q, s.num_heads), split_heads(k, s.num_kv_heads),
                   split_heads(v, s.num_kv_heads))
        if s.qk_norm and not s.qk_norm_whole:
            q, k = self._norm(q, w["q_norm.weight"]), self._norm(k, w["k_norm.weight"])
        if layer in s.nope_layers:
            return q, k, v
        rope = self.local_rope if s.uses_local_rope(layer) else self.rope
        dt = torch.float32 if s.rope_fp32 else h.dtype      # (Llama 4: fp32, rounded once)
        key = (id(rope), dt)
        tables = None if rope_cache is None else rope_cache.get(key)
        if tables is None:
            tables = rope.cos_sin(positions, dt)
            if rope_cache is not None:
                rope_cache[key] = tables
        cos, sin = tables
        q, k = (apply_rope(t.to(dt), cos, sin).to(t.dtype) for t in (q, k))
        if s.qk_l2_norm:                # Llama 4: weightless, after RoPE, in fp32
            q, k = (_rms_fp32(t, s.norm_eps).to(t.dtype) for t in (q, k))
        if s.query_pos_scale is not None:
            beta, period = s.query_pos_scale
            grow = 1 + beta * torch.log1p(torch.floor(positions.float() / period))
            q = q * grow[..., None, None].to(q.dtype)
        return q, k, v

    def post_attn(self, w: dict, h: torch.Tensor, attn: torch.Tensor, experts=None,
                  layer: int | None = None) -> torch.Tensor:
        """o-projection, residual, norm and MLP; experts: the runner of a MoE layer's routed
        experts (moe.moe_mlp; None: from w); layer: where the routing statistics go."""
        s = self.spec
        o = linear(attn, w["o.weight"], w.get("o.bias"))
        if s.sandwich_norms:
            o = self._norm(o, w["post_attn_norm.weight"])
        if s.residual_multiplier != 1.0:
            o = o * s.residual_multiplier
        h, x = self._add_norm(h, o, w.get("mlp_norm.weight"))
        if "router.weight" in w:        # a mixture-of-experts layer
            x = moe_mlp(x, w, s, self.moe_stats, experts, layer)
        else:
            x = self._mlp(w, x)
        if s.sandwich_norms:
            x = self._norm(x, w["post_mlp_norm.weight"])
        if s.residual_multiplier != 1.0:
            x = x * s.residual_multiplier
        return h + x

    def _mlp(self, w: dict, x: torch.Tensor) -> torch.Tensor:
        g, up = linear_rows(x, [w["gate.weight"], w["up.weight"]],
                            [w.get("gate.bias"), w.get("up.bias")])
        if self.spec.mlp_act == "silu":
            g = F.silu(g, inplace=True).mul_(up)        # in place: 2 (b, s, ffn) live
        else:
            g = F.gelu(g, approximate="tanh").mul_(up)
        return linear(g, w["down.weight"], w.get("down.bias"))

    def head(self, w: dict, h: torch.Tensor) -> torch.Tensor:
        s = self.spec
        h = self._norm(h, w["head.norm.weight"])
        lm = w["embed.tokens"] if s.tie_word_embeddings else w["head.lm_head"]
        logits = linear(h, lm)
        if s.logits_divisor != 1.0:
            logits = logits / s.logits_divisor
        if s.final_softcap:
            logits = torch.tanh(logits / s.final_softcap) * s.final_softcap
        return logits


def _rms_fp32(t: torch.Tensor, eps: float) -> torch.Tensor:
    """t / rms(t) over the last dim, in fp32 (the weights, where a norm has them, after)."""
    tf = t.float()
    return tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + eps)


def model_for(spec: ModelSpec):
    """The math object for a spec's architecture."""
    return OPTModel(spec) if spec.arch == "opt" else LlamaModel(spec)

