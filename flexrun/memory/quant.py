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


def compress(x: torch.Tensor, bits: int = 4, group_size: int = 64, dim: int = -1) -> Compressed:
    """Quantize `x` group-wise along `dim` (groups of `group_size` consecutive values)."""
    _check(bits, group_size)
    if not x.is_floating_point():
        raise TypeError(f"quant: expected a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("quant: cannot compress a 0-dim tensor")
    dim = dim % x.dim()
    n = x.shape[dim]
    pad = -n % group_size
    xf = x.float().movedim(dim, -1)
    if pad and n:   # repeat the last value: it does not widen the group's range
        xf = torch.cat([xf, xf[..., -1:].expand(*xf.shape[:-1], pad)], dim=-1)
    g = xf.reshape(*xf.shape[:-1], (n + pad) // group_size, group_size)

    levels = 2 ** bits - 1
    mn = g.amin(dim=-1, keepdim=True)
    mx = g.amax(dim=-1, keepdim=True)
    mins = mn.half()
    scales = ((mx - mn) / levels).half()
    # Encode with the fp16-rounded parameters, exactly as decompress will decode.
    mn_r, sc_r = mins.float(), scales.float()
    safe = torch.where(sc_r > 0, sc_r, torch.ones_like(sc_r))
    q = ((g - mn_r) / safe).round_().clamp_(0, levels)
    q = q.masked_fill_(sc_r == 0, 0).to(torch.uint8).reshape(-1)

    if bits == 4:
        if q.numel() % 2:
            q = torch.cat([q, q.new_zeros(1)])
        q = q.view(-1, 2)
        data = q[:, 0] | (q[:, 1] << 4)
    else:
        data = q
    return Compressed(data=data.contiguous(), mins=mins, scales=scales, shape=tuple(x.shape),
                      dim=dim, bits=bits, group_size=group_size, pad=pad, dtype=x.dtype)


def _unpack(c: Compressed) -> torch.Tensor:
    """The uint8 codes, viewed as (..., ngroups, group_size) in the moved layout."""
    if c.bits == 4:
        q = torch.stack((c.data & 0x0F, c.data >> 4), dim=-1).view(-1)
    else:
        q = c.data
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
