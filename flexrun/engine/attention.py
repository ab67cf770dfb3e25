"""Attention with padding and causal masks; q (b, heads, s, hd), k/v (b, kv_heads, T, hd)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """valid: (b, s) bool of real (non-pad) tokens -> (b, 1, s, s) bool attention mask.

    Causal over real keys; every query also sees itself, so pad rows stay finite."""
    s = valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(s, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]


def decode_mask(valid: torch.Tensor) -> torch.Tensor:
    """valid: (b, T) bool of real keys (the new token included) -> (b, 1, 1, T)."""
    return valid[:, None, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           causal: bool = False) -> torch.Tensor:
    """Grouped-query attention when kv_heads < heads -> (b, s, heads*hd).

    mask None means no padding: plain causal (prefill) or full (decode) attention, which
    lets SDPA pick its fastest kernel."""
    b, nh, s, hd = q.shape
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                         enable_gqa=k.shape[1] != nh)
    return out.transpose(1, 2).reshape(b, s, nh * hd)


# How decode attention runs on the host: "sdpa" (PyTorch's kernel) or "matmul" (two batched
# matmuls in the cache dtype around an fp32 softmax; faster for fp16 caches on CPUs whose
# SDPA converts fp16 element by element).
HOST_DECODE_ATTN = os.environ.get("FLEXRUN_HOST_ATTN", "sdpa")


def attend_host(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
    """Decode attention (one query per row) on host tensors -> (b, 1, heads*hd)."""
    if HOST_DECODE_ATTN != "matmul" or q.shape[2] != 1:
        return attend(q, k, v, mask)
    b, nh, _, hd = q.shape
    kvh = k.shape[1]
    qg = q.reshape(b, kvh, nh // kvh, hd)                       # (b, kv, group, hd)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float().mul_(hd ** -0.5)
    if mask is not None:                                        # (b, 1, 1, T)
        scores.masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores, -1).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, 1, nh * hd)
