"""A KV slot that stores K and V group-quantized along the head dimension (compress_cache).

Each of K and V becomes three planes with the slot's (b, kv_heads, T) layout: packed codes
(head_dim * bits / 8 bytes per position), fp16 group minimums and fp16 group scales. Every
plane is an ordinary KVSlot, so the GPU, CPU (pinned, async stores) and disk homes, the
time-major / batch-major layouts and the stores' overlap work exactly as for dense slots,
with ~3.5x fewer bytes at 4 bits. New positions are quantized where they are written;
reads dequantize [0, t_end) on the device that attends (the CPU under cpu_attention).
Prefill attention itself uses the exact K and V, as in FlexGen.
"""
from __future__ import annotations

import torch

from flexrun.memory.quant import Compressed, compress, decompress


class CompressedKVSlot:
    """K and V of one (layer, batch) as quantized planes; same interface as KVSlot."""

    def __init__(self, make_slot, shape: tuple[int, int, int, int], dtype: torch.dtype,
                 bits: int, group: int):
        b, kv, T, hd = shape
        self.bits, self.dtype, self.head_dim = bits, dtype, hd
        self.group = group if hd % group == 0 else hd     # groups never straddle heads
        ng = hd // self.group
        self.max_len, self.rows = T, b
        self.planes = [make_slot((b, kv, T, hd * bits // 8), torch.uint8, "q"),
                       make_slot((b, kv, T, ng), torch.float16, "min"),
                       make_slot((b, kv, T, ng), torch.float16, "scale")]
        self.tier = self.planes[0].tier

    @property
    def on_host(self) -> bool:
        return self.planes[0].on_host

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, kv, s, hd = x.shape
        c = compress(x, self.bits, self.group, dim=-1)
        return (c.data.view(b, kv, s, -1), c.mins.view(b, kv, s, -1),
                c.scales.view(b, kv, s, -1))

    def write(self, k: torch.Tensor, v: torch.Tensor, t0: int) -> None:
        """Quantize k, v (b, kv_heads, s, hd) and store them at positions t0..t0+s."""
        for plane, pk, pv in zip(self.planes, self._split(k), self._split(v)):
            plane.write(pk, pv, t0)

    def read(self, t_end: int, device: torch.device, pinned: bool = False):
        """(K, V) for positions [0, t_end), dequantized on `device` to the compute dtype."""
        (qk, qv), (mk, mv), (sk, sv) = (p.read(t_end, device, pinned) for p in self.planes)
        return [self._dense(q, m, s) for q, m, s in ((qk, mk, sk), (qv, mv, sv))]

    def _dense(self, q: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        b, kv, t, _ = q.shape
        c = Compressed(data=q.reshape(-1), mins=m.contiguous().unsqueeze(-1),
                       scales=s.contiguous().unsqueeze(-1), shape=(b, kv, t, self.head_dim),
                       dim=3, bits=self.bits, group_size=self.group, pad=0, dtype=self.dtype)
        return decompress(c)

    def close(self) -> None:
        for p in self.planes:
            p.close()
