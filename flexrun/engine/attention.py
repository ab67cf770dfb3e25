"""Attention over a time-major KV cache, with padding and causal masks."""
from __future__ import annotations

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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q: (b, s, heads, hd); k, v: time-major (T, b, kv_heads, hd) -> (b, s, heads*hd).

    Grouped-query attention when kv_heads < heads. fp16 on CPU is computed in fp32."""
    b, s, nh, hd = q.shape
    dtype = q.dtype
    if q.device.type == "cpu" and dtype == torch.float16:
        q, k, v = q.float(), k.float(), v.float()
    qh = q.transpose(1, 2)                       # (b, heads, s, hd)
    kh = k.permute(1, 2, 0, 3)                   # (b, kv, T, hd)
    vh = v.permute(1, 2, 0, 3)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask,
                                         enable_gqa=kh.shape[1] != nh)
    return out.transpose(1, 2).reshape(b, s, nh * hd).to(dtype)
