"""OPT layers as functions of handed-in weights (pre-LN and post-LN/opt-350m shapes)."""
from __future__ import annotations

import torch

from flexrun.models.common import (add_norm, dense, layer_norm, linear, linear_relu, linear_rows,
                                   split_heads)
from flexrun.models.spec import ModelSpec

POSITION_OFFSET = 2  # OPT's learned positions start at index 2


class OPTModel:
    """Math of one OPT unit at a time; weights come in as dicts of tensors."""
    JOINED = (("q", "k", "v"),)     # weights a layer multiplies as one (TieredStore.join)

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    def embed(self, w: dict, ids: torch.Tensor, positions: torch.Tensor, dtype) -> torch.Tensor:
        x = dense(w["embed.tokens"])[ids].to(dtype)
        if "embed.project_in" in w:
            x = linear(x, w["embed.project_in"])
        pos = dense(w["embed.positions"])[positions + POSITION_OFFSET].to(dtype)
        return x + pos

    def pre_attn(self, w: dict, h: torch.Tensor, positions: torch.Tensor,
                 layer: int | None = None, rope_cache: dict | None = None):
        """Normed input -> q, k, v (b, s, heads, hd); learned positions (no RoPE tables)."""
        s = self.spec
        x = layer_norm(h, w["attn_norm.weight"], w["attn_norm.bias"], s.norm_eps) \
            if s.do_layer_norm_before else h
        q, k, v = linear_rows(x, [w["q.weight"], w["k.weight"], w["v.weight"]],
                              [w["q.bias"], w["k.bias"], w["v.bias"]])
        return (split_heads(q, s.num_heads), split_heads(k, s.num_kv_heads),
                split_heads(v, s.num_kv_heads))

    def post_attn(self, w: dict, h: torch.Tensor, attn: torch.Tensor, experts=None,
                  layer: int | None = None) -> torch.Tensor:
        """o-projection, residual and MLP (experts, layer: for MoE models only)."""
        s = self.spec
        o = linear(attn, w["o.weight"], w["o.bias"])
        if s.do_layer_norm_before:
            h, x = add_norm(h, o, w["mlp_norm.weight"], w["mlp_norm.bias"], s.norm_eps, False)
        else:
            h = x = layer_norm(h + o, w["attn_norm.weight"], w["attn_norm.bias"], s.norm_eps)
        x = linear(linear_relu(x, w["fc1.weight"], w["fc1.bias"]), w["fc2.weight"],
                   w["fc2.bias"])
        h = h + x
        if not s.do_layer_norm_before:
            h = layer_norm(h, w["mlp_norm.weight"], w["mlp_norm.bias"], s.norm_eps)
        return h

    def head(self, w: dict, h: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.final_layer_norm:
            h = layer_norm(h, w["head.norm.weight"], w["head.norm.bias"], s.norm_eps)
        if "head.project_out" in w:
            h = linear(h, w["head.project_out"])
        lm = w["embed.tokens"] if s.tie_word_embeddings else w["head.lm_head"]
        return linear(h, lm)
