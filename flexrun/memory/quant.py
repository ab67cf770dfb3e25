"""Asymmetric min-max group-wise quantization (as in FlexGen), 4 or 8 bits.

Values are split into groups of `group_size` consecutive elements along `dim`; each group
keeps an fp16 minimum and an fp16 scale, and each value becomes round((x - min) / scale)
in [0, 2**bits - 1]. 4-bit codes are packed two per byte (low nibble first).

Layout: `dim` is moved to the last axis, padded (by repeating its last value) to a multiple
of `group_size` and viewed as (..., ngroups, group_size); `data` is that code tensor
flattened and packed (one extra zero nibble when the count of 4-bit codes is odd), and
`mins` / `scales` have shape (..., ngroups, 1).

The codes are computed with the fp16-rounded min and scale, so decompression reproduces
exactly what was encoded: a group whose values are mn + k * step (k = 0 .. 2**bits - 1, all
levels spanned, mn and step exact in fp16) round-trips bit-exactly, and so does a constant
group whose value is exact in fp16. Values beyond the fp16 range are not supported.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from flexrun.kernels.dequant import inv_levels

BITS = (4, 8)


@dataclass
class Compressed:
    """A quantized tensor: packed codes plus per-group fp16 mins and scales."""
    data: torch.Tensor          # uint8, 1-D, packed codes
    mins: torch.Tensor          # fp16, (..., ngroups, 1)
    scales: torch.Tensor        # fp16, (..., ngroups, 1)
    shape: tuple[int, ...]      # original shape
    dim: int                    # quantized axis, non-negative
    bits: int
    group_size: int
    pad: int                    # values appended on `dim` to reach a multiple of group_size
    dtype: torch.dtype          # original dtype

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed codes plus fp16 mins and scales."""
        return (self.data.numel() * self.data.element_size()
                + self.mins.numel() * self.mins.element_size()
                + self.scales.numel() * self.scales.element_size())

    @property
    def device(self) -> torch.device:
        return self.data.device

    def _map(self, fn) -> Compressed:
        return dataclasses.replace(self, data=fn(self.data), mins=fn(self.mins),
                                   scales=fn(self.scales))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Compressed:
        """Copy the tensors to `device` (no-op for tensors already there)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Compressed:
        """Page-locked host copies, for asynchronous transfers."""
        return self._map(lambda t: t.pin_memory())


def _check(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"quant: bits must be 4 or 8, got {bits}")
    if group_size < 1:
        raise ValueError(f"quant: group_size must be >= 1, got {group_size}")


def compressed_nbytes(shape, bits: int = 4, group_size: int = 64, dim: int = -1) -> int:
    """Bytes `compress` would store for a tensor of `shape`, without building it."""
    _check(bits, group_size)
    shape = tuple(shape)
    if not shape:
        raise ValueError("quant: cannot compress a 0-dim tensor")
    dim = dim % len(shape)
    groups = math.prod(shape[:dim] + shape[dim + 1:]) * -(-shape[dim] // group_size)
    codes = groups * group_size
    return -(-codes * bits // 8) + 4 * groups


def grouped(x: torch.Tensor, group_size: int, dim: int) -> tuple[torch.Tensor, int]:
    """x in fp32 with `dim` moved last, padded (last value repeated: it does not widen a
    group's range) to a multiple of group_size and viewed as (..., ngroups, group_size);
    and the pad."""
    n = x.shape[dim]
    pad = -n % group_size
    xf = x.float().movedim(dim, -1)
    if pad and n:
        xf = torch.cat([xf, xf[..., -1:].expand(*xf.shape[:-1], pad)], dim=-1)
    return xf.reshape(*xf.shape[:-1], (n + pad) // group_size, group_size), pad


def minmax(g: torch.Tensor, bits: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest parameters of groups running along `dim` of g: fp16 (min, scale =
    (max - min) / (2**bits - 1)), kept dims."""
    mn = g.amin(dim=dim, keepdim=True)
    mx = g.amax(dim=dim, keepdim=True)
    return mn.half(), scale_of(mx - mn, bits)


def scale_of(span: torch.Tensor, bits: int) -> torch.Tensor:
    """fp16 scales of fp32 group ranges (max - min): span times the fp32 reciprocal of
    2**bits - 1, the same on the CPU, on CUDA and in the Triton kernels."""
    return (span * inv_levels(bits)).half()


def encode(g: torch.Tensor, mins: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes round((g - min) / scale) in 0..2**bits-1 (uint8) with the given fp16 parameters
    (broadcast against g), exactly as decompress decodes them; a zero scale gives code 0."""
    mn_r, sc_r = mins.float(), scales.float()
    safe = torch.where(sc_r > 0, sc_r, torch.ones_like(sc_r))
    q = ((g - mn_r) / safe).round_().clamp_(0, 2 ** bits - 1)
    return q.masked_fill_(sc_r == 0, 0).to(torch.uint8)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes -> packed bytes along the last axis (4-bit: two per byte, low nibble
    first; the axis must be even); 8-bit codes are returned as they are."""
    if bits == 8:
        return q
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack(data: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of pack: (..., n) bytes -> (..., n * 8 // bits) codes."""
    if bits == 8:
        return data
    return torch.stack((data & 0x0F, data >> 4), dim=-1).flatten(-2)


def from_codes(q: torch.Tensor, mins: torch.Tensor, scales: torch.Tensor, shape, dim: int,
               bits: int, group_size: int, pad: int, dtype: torch.dtype) -> Compressed:
    """A Compressed of codes q (..., ngroups, group_size) and their fp16 parameters."""
    q = q.reshape(-1)
    if bits == 4:
        if q.numel() % 2:
            q = torch.cat([q, q.new_zeros(1)])
        data = pack(q.view(-1, 2), 4).view(-1)
    else:
        data = q
    return Compressed(data=data.contiguous(), mins=mins, scales=scales, shape=tuple(shape),
                      dim=dim, bits=bits, group_size=group_size, pad=pad, dtype=dtype)


def compress(x: torch.Tensor, bits: int = 4, group_size: int = 64, dim: int = -1) -> Compressed:
    """Quantize `x` group-wise along `dim` (groups of `group_size` consecutive values)."""
    _check(bits, group_size)
    if not x.is_floating_point():
        raise TypeError(f"quant: expected a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("quant: cannot compress a 0-dim tensor")
    dim = dim % x.dim()
    g, pad = grouped(x, group_size, dim)
    mins, scales = minmax(g, bits)
    # Encode with the fp16-rounded parameters, exactly as decompress will decode.
    return from_codes(encode(g, mins, scales, bits), mins, scales, x.shape, dim, bits,
                      group_size, pad, x.dtype)


def _unpack(c: Compressed) -> torch.Tensor:
    """The uint8 codes, viewed as (..., ngroups, group_size) in the moved layout."""
    q = unpack(c.data, c.bits)
    count = c.mins.numel() * c.group_size
    if q.numel() != count:   # drop the odd trailing nibble
        q = q[:count]
    return q.view(*c.mins.shape[:-1], c.group_size)


def decompress(c: Compressed, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild the tensor: x = q * scale + min (in fp32), cast to `dtype` (default c.dtype).

    On CUDA, 4-bit weights and cache groups take a fused Triton kernel (dequant_triton) when
    it is installed; this function's own arithmetic is the reference it is tested against."""
    from flexrun.kernels import dequant as dequant_triton
    if dequant_triton.enabled() and dequant_triton.supports(c, dtype or c.dtype):
        return dequant_triton.dequantize4(c, dtype or c.dtype)
    return decompress_plain(c, dtype)


def decompress_plain(c: Compressed, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The reference decompression in plain PyTorch (any device, layout and bit width)."""
    q = _unpack(c)
    x = torch.addcmul(c.mins.float(), q, c.scales.float()).to(dtype or c.dtype)
    x = x.reshape(*x.shape[:-2], -1)
    if c.pad:
        x = x[..., :x.shape[-1] - c.pad]
    x = x.movedim(-1, c.dim)
    return x if x.is_contiguous() else x.contiguous()


def rows_alike(cs: list) -> bool:
    """Whether `cs` are 2-D weights compressed along their last axis without padding, alike
    in everything but their row count (so their parts stack row after row)."""
    def key(c):
        return c.shape[1:], c.dim, c.bits, c.group_size, c.pad, c.dtype, c.device
    return bool(cs) and all(isinstance(c, Compressed) and len(c.shape) == 2 and c.dim == 1
                            and c.pad == 0 and key(c) == key(cs[0]) for c in cs)


def join_rows(cs: list) -> list[Compressed] | None:
    """`cs` (see rows_alike) laid out back to back in one buffer per part, each keeping a
    view of its rows: what `models.common.linear_rows` multiplies as one matrix; None when
    they are not alike."""
    if not rows_alike(cs):
        return None
    views = {}
    for f in ("data", "mins", "scales"):
        ts = [getattr(c, f) for c in cs]
        views[f] = torch.cat(ts).split([t.shape[0] for t in ts])
    return [dataclasses.replace(c, data=d, mins=m, scales=s)
            for c, d, m, s in zip(cs, views["data"], views["mins"], views["scales"])]


# ---- KV cache layouts (engine/kvquant.py stores them; plan/footprint.py counts them) -------
def kv_groups(head_dim: int, group: int, scheme: str) -> tuple[int, int]:
    """(values per group along the head dim, tokens per key group) of a compressed KV slot:
    kivi groups keys per channel over `group` tokens and values per token; per_token groups
    both along the head dim. A head-dim group never straddles two heads."""
    g = group if head_dim % group == 0 else head_dim
    return g, (group if scheme == "kivi" else 1)


def kv_ring_len(window: int, token_group: int) -> int:
    """Exact positions a slot keeps: the window, plus a key group that has not filled yet."""
    return window + token_group - 1


def kv_slot_nbytes(rows: int, T: int, kv_heads: int, head_dim: int, elem: int, bits: int,
                   group: int, scheme: str, window: int, sink: int = 0) -> int:
    """Stored bytes of one compressed (layer, batch) KV slot of T positions: K and V codes,
    fp16 mins and scales, the exact ring of recent positions and the exact sink tokens."""
    g, tg = kv_groups(head_dim, group, scheme)
    ng = head_dim // g
    key_params = -(-T // tg) * (head_dim if scheme == "kivi" else ng)
    codes = 2 * T * head_dim * bits // 8
    params = 2 * 2 * (key_params + T * ng)
    ring = 2 * (kv_ring_len(window, tg) + sink) * head_dim * elem
    return rows * kv_heads * (codes + params + ring)
