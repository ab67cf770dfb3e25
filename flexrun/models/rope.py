"""Rotary position embeddings: the inverse frequencies of every rope_scaling kind flexrun
runs (default, linear, llama3, yarn, longrope/su) and cos/sin tables as transformers makes them."""
from __future__ import annotations

import math

import torch

from flexrun.config import FlexrunError
from flexrun.models.spec import ModelSpec

KINDS = ("default", "linear", "llama3", "yarn", "longrope")


def _base_inv(theta: float, hd: int, factors=None) -> torch.Tensor:
    exps = torch.arange(0, hd, 2, dtype=torch.int64).float() / hd
    if factors is None:
        return 1.0 / (theta ** exps)
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * theta ** exps)


def _llama3(inv: torch.Tensor, sc: dict) -> torch.Tensor:
    factor = float(sc["factor"])
    lo, hi = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(spec: ModelSpec, sc: dict) -> tuple[torch.Tensor, float]:
    """YaRN (Qwen2.5's long-context configs), as transformers' _compute_yarn_parameters."""
    hd, base = spec.rotary_dim or spec.head_dim, spec.rope_theta
    orig = float(sc["original_max_position_embeddings"])
    factor = sc.get("factor") or spec.max_positions / orig
    attn = sc.get("attention_factor")
    if attn is None:
        m, m_all = sc.get("mscale"), sc.get("mscale_all_dim")
        attn = (_yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if m and m_all
                else _yarn_mscale(factor))
    beta_fast, beta_slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return hd * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))
    lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
    if sc.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, hd - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(hd // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    pos = base ** (torch.arange(0, hd, 2).float() / hd)
    extra = 1 - ramp
    inv = (1.0 / (factor * pos)) * (1 - extra) + (1.0 / pos) * extra
    return inv, float(attn)


class Rope:
    """cos/sin of positions for one model. longrope switches each row to the long factors once
    its longest position passes original_max_position_embeddings, as transformers does for a
    sequence generated alone (its check is per forward call: max(position_ids) + 1)."""

    def __init__(self, spec: ModelSpec):
        sc = spec.rope_scaling or {}
        kind = sc.get("rope_type", sc.get("type", "default"))
        kind = "longrope" if kind == "su" else kind
        hd, theta = spec.rotary_dim or spec.head_dim, spec.rope_theta
        self.long_inv, self.switch_at, self.attention_factor = None, None, 1.0
        if kind == "default":
            self.inv = _base_inv(theta, hd)
        elif kind == "linear":
            self.inv = _base_inv(theta, hd) / float(sc["factor"])
        elif kind == "llama3":
            self.inv = _llama3(_base_inv(theta, hd), sc)
        elif kind == "yarn":
            self.inv, self.attention_factor = _yarn(spec, sc)
        elif kind == "longrope":
            orig = int(sc["original_max_position_embeddings"])
            factor = sc.get("factor") or spec.max_positions / orig
            attn = sc.get("attention_factor")
            if attn is None:
                attn = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
            self.inv = _base_inv(theta, hd, sc["short_factor"])
            self.long_inv = _base_inv(theta, hd, sc["long_factor"])
            self.switch_at, self.attention_factor = orig, float(attn)
        else:
            raise FlexrunError(f"rope_scaling type {kind!r} is not supported (use one of "
                               f"{', '.join(KINDS)})")
        self._on: dict[torch.device, tuple] = {}

    def _tables(self, dev: torch.device) -> tuple:
        t = self._on.get(dev)
        if t is None:
            t = self._on[dev] = (self.inv.to(dev),
                                 None if self.long_inv is None else self.long_inv.to(dev))
        return t

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (b, s) -> cos, sin (b, s, 1, head_dim) in `dtype`."""
        inv, long_inv = self._tables(positions.device)
        pos = positions.float()[..., None]
        freqs = pos * inv                                   # (b, s, hd/2)
        if long_inv is not None:
            longer = (positions.amax(-1) + 1 > self.switch_at)[:, None, None]
            freqs = torch.where(longer, pos * long_inv, freqs)
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def interleaved_to_halves(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows (weights or biases) of heads rotated in interleaved pairs (Meta's layout:
    llama.cpp's GGUFs, Llama 4) reordered for rotate-half RoPE: per head the pairs' first
    elements, then their second ones. q.k is unchanged by the reorder; llama.cpp's converter
    applies the inverse, `w.reshape(n_head, 2, d // 2, *rest).swapaxes(1, 2)`."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2)
            .reshape(w.shape))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (b, s, heads, hd); cos/sin: (b, s, 1, rd). HF's rotate-half convention over the
    first rd dims (all of them but with partial_rotary_factor), the rest as they are."""
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rd], cos, sin), x[..., rd:]), -1)
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin
