"""A KV slot that stores K and V group-quantized (compress_cache), two schemes:

- kivi (KIVI, arXiv 2402.02750): keys per channel, each group `group` consecutive tokens of
  one channel (key outliers live in fixed channels, so a channel's range is narrow), values
  per token, in groups along the head dim;
- per_token (FlexGen): K and V both in groups along the head dim.

The last `window` positions stay exact; under kivi a key stays exact until its whole token
group has left the window (at most window + group - 1 exact keys). So do each row's first
`sink` prompt tokens (attention sinks: most heads put much of their weight there, so their
error weighs on every later step; under kivi they are also left out of their key group's
range). Storage, all ordinary KVSlots, so the GPU, CPU (pinned, async stores) and disk homes
and their layouts work as for dense slots:
  codes   (b, kv, T, hd*bits/8) uint8: K codes, V codes
  kparams fp16 K mins, K scales: (b, kv, T/group, hd) under kivi, (b, kv, T, hd/g) per token
  vparams fp16 V mins, V scales: (b, kv, T, hd/g)
  ring    (b, kv, window + group - 1, hd) exact K and V of the recent positions, position p
          at p mod its length
  sink    (b, kv, sink, hd) exact K and V of each row's first prompt tokens.
Writes quantize on the device that computed k, v (a key group when it leaves the window,
its exact keys taken from the ring); reads dequantize [0, t_end) on the device that attends
and put the exact positions back in. Prefill attention itself uses the exact K and V (as in
FlexGen); every decode step reads the cache (`LLM.score_decode` measures what that costs).
"""
from __future__ import annotations

import torch

from flexrun.kernels import token_quant
from flexrun.kernels.qattention import QuantPlanes
from flexrun.memory.quant import (Compressed, decompress, encode, kv_groups, kv_ring_len,
                                  minmax, pack, scale_of, unpack)

CHUNK_VALUES = 1 << 20      # values a CPU read dequantizes at a time (4 MB of fp32)


class CompressedKVSlot:
    """K and V of one (layer, batch) quantized; same interface as KVSlot."""

    def __init__(self, make_slot, shape: tuple[int, int, int, int], dtype: torch.dtype,
                 bits: int, group: int, scheme: str = "kivi", window: int = 0,
                 sink: int = 0):
        b, kv, T, hd = shape
        self.bits, self.dtype, self.head_dim = bits, dtype, hd
        self.scheme, self.window = scheme, window
        self.group, self.tgroup = kv_groups(hd, group, scheme)
        ng = hd // self.group
        self.max_len, self.rows = T, b
        kivi = scheme == "kivi"
        self.codes = make_slot((b, kv, T, hd * bits // 8), torch.uint8, "q")
        self.kparams = make_slot((b, kv, -(-T // self.tgroup), hd) if kivi else (b, kv, T, ng),
                                 torch.float16, "kp")
        self.vparams = make_slot((b, kv, T, ng), torch.float16, "vp")
        self.ring_len = kv_ring_len(window, self.tgroup)
        self.ring = make_slot((b, kv, self.ring_len, hd), dtype, "ring") \
            if self.ring_len else None
        self.sink = make_slot((b, kv, sink, hd), dtype, "sink") if sink else None
        self.sink_at = None         # (b, sink) the sink tokens' positions
        self.planes = [p for p in (self.codes, self.kparams, self.vparams, self.ring,
                                   self.sink) if p]
        self.tier = self.codes.tier
        self.t = self.q = 0         # positions written; keys below q are quantized
        self.first = None           # (b,) each row's first real position (left padding)

    @property
    def on_host(self) -> bool:
        return self.codes.on_host

    def boundary(self, t: int) -> int:
        """Keys below this position are quantized once t positions are written."""
        return max(0, t - self.window) // self.tgroup * self.tgroup

    # ---- write ------------------------------------------------------------------------------
    def write(self, k: torch.Tensor, v: torch.Tensor, t0: int,
              first: torch.Tensor | None = None) -> None:
        """Store k, v (b, kv_heads, s, hd) at positions t0..t0+s (t0 = 0 starts a new block;
        then positions before `first` (b,) are padding, left out of key groups). The planes'
        stores to host memory are held as one (kvcache.StoreHold)."""
        with self.codes.hold.group():
            self._write(k, v, t0, first)

    def _write(self, k: torch.Tensor, v: torch.Tensor, t0: int, first) -> None:
        if t0 == 0:
            self.t = self.q = 0
            self.first = first
            if self.sink is not None:
                self._write_sink(k, v, first)
        if t0 != self.t:
            raise RuntimeError(f"compressed KV slot: write at {t0}, expected {self.t}")
        s = k.shape[2]
        t1 = t0 + s
        q1 = self.boundary(t1)
        if q1 > self.q:         # key groups leaving the window: exact keys from ring and k
            parts = [self._ring_keys(self.q, min(t0, q1), k.device)] if self.q < t0 else []
            if q1 > t0:
                parts.append(k[:, :, :q1 - t0])
            keys = torch.cat(parts, 2) if len(parts) > 1 else parts[0]
            kc, kmin, ksc = (self._per_channel(keys, self.q) if self.scheme == "kivi"
                             else self._per_token(keys))
            self.codes.write(kc, None, self.q)
            self.kparams.write(kmin, ksc, self.q // self.tgroup)
        vc, vmin, vsc = self._per_token(v)
        self.codes.write(None, vc, t0)
        self.vparams.write(vmin, vsc, t0)
        lo = max(t0, q1)
        if lo < t1:
            self._ring_write(k[:, :, lo - t0:], v[:, :, lo - t0:], lo)
        self.t, self.q = t1, q1

    def _per_token(self, x: torch.Tensor):
        """codes (b, kv, s, hd*bits/8), mins and scales (b, kv, s, hd/g): groups along hd."""
        if token_quant.applies(x, self.group, self.bits):     # one launch (CUDA)
            out = token_quant.FALLBACK.run(lambda: token_quant.quantize_tokens(x, self.group), x)
            if out is not None:
                return out
        b, kv, s, hd = x.shape
        g = x.float().view(b, kv, s, hd // self.group, self.group)
        mins, scales = minmax(g, self.bits)
        q = encode(g, mins, scales, self.bits).view(b, kv, s, hd)
        return pack(q, self.bits), mins[..., 0], scales[..., 0]

    def _per_channel(self, x: torch.Tensor, p0: int):
        """codes (b, kv, n, hd*bits/8), mins and scales (b, kv, n/G, hd) of keys at positions
        p0..p0+n (whole groups of G tokens): each channel's range over a group's real
        positions (padding excluded; a group of padding only gets range 0)."""
        b, kv, n, hd = x.shape
        G = self.tgroup
        g = x.float().view(b, kv, n // G, G, hd)
        if self.first is not None:
            pos = torch.arange(p0, p0 + n, device=x.device)
            real = (pos[None, :] >= self.first.to(x.device)[:, None]).view(b, 1, n // G, G, 1)
            mn = torch.where(real, g, float("inf")).amin(3, keepdim=True)
            mx = torch.where(real, g, float("-inf")).amax(3, keepdim=True)
            empty = ~real.any(3, keepdim=True)
            mn, mx = mn.masked_fill(empty, 0.0), mx.masked_fill(empty, 0.0)
        else:
            mn, mx = g.amin(3, keepdim=True), g.amax(3, keepdim=True)
        mins, scales = mn.half(), scale_of(mx - mn, self.bits)
        q = encode(g, mins, scales, self.bits).view(b, kv, n, hd)
        return pack(q, self.bits), mins[:, :, :, 0], scales[:, :, :, 0]

    def _write_sink(self, k: torch.Tensor, v: torch.Tensor, first: torch.Tensor | None) -> None:
        """Keep each row's first `sink` prompt tokens exact (fewer in a shorter prompt: its
        last token repeats); key groups start after them."""
        b, kv, s, hd = k.shape
        S = self.sink.shape[2]
        f = torch.zeros(b, dtype=torch.long, device=k.device) if first is None else \
            first.to(k.device)
        at = (f[:, None] + torch.arange(S, device=k.device)).clamp(max=s - 1)
        self.sink_at = at
        idx = at[:, None, :, None].expand(b, kv, S, hd)
        self.sink.write(k.gather(2, idx), v.gather(2, idx), 0)
        self.first = torch.minimum(f + S, torch.full_like(f, s))

    def _ring_index(self, lo: int, hi: int, device) -> torch.Tensor:
        return torch.arange(lo, hi, device=device) % self.ring_len

    def _ring_keys(self, lo: int, hi: int, device) -> torch.Tensor:
        """Exact keys of positions [lo, hi) (all in the ring) on `device`."""
        rk, _ = self.ring.read(self.ring_len, device)
        return rk.index_select(2, self._ring_index(lo, hi, device))

    def _ring_write(self, k: torch.Tensor, v: torch.Tensor, p0: int) -> None:
        """Exact k, v of positions p0.. into the ring (wrapping around its end)."""
        at, n = p0 % self.ring_len, k.shape[2]
        head = min(n, self.ring_len - at)
        self.ring.write(k[:, :, :head], v[:, :, :head], at)
        if head < n:
            self.ring.write(k[:, :, head:], v[:, :, head:], 0)

    # ---- read -------------------------------------------------------------------------------
    def read(self, t_end: int, device: torch.device, pinned: bool = False,
             planes: QuantPlanes | None = None):
        """(K, V) for positions [0, t_end), dequantized on `device` to the compute dtype, the
        exact recent positions as they were written; from `planes` (quant_planes) when
        already read."""
        p = planes or self.quant_planes(t_end, device, pinned)
        q, w0 = p.quantized_keys, p.quantized_values
        V = self._dequant(p.v_codes, p.v_min, p.v_scale, False)
        K = torch.empty_like(V)
        if q:
            self._dequant(p.k_codes[:, :, :q], p.k_min, p.k_scale, p.kivi, K[:, :, :q])
        if q < t_end:
            idx = self._ring_index(q, t_end, device)
            K[:, :, q:] = p.ring_k.index_select(2, idx)
            if w0 < t_end:
                V[:, :, w0:] = p.ring_v.index_select(2, idx[w0 - q:])
        if p.sink_k is not None:
            rows = torch.arange(K.shape[0], device=device)[:, None]
            K[rows, :, p.sink_at] = p.sink_k.transpose(1, 2)
            V[rows, :, p.sink_at] = p.sink_v.transpose(1, 2)
        return [K, V]

    def quant_planes(self, t_end: int, device: torch.device, pinned: bool = False
                     ) -> QuantPlanes:
        """The slot's planes for positions [0, t_end) on `device`, as the fused 4-bit decode
        attention (kernels/qattention.py) reads them in place of read()'s dense K and V."""
        q = min(self.q, t_end)
        qk, qv = self.codes.read(t_end, device, pinned)
        kmin, ksc = self.kparams.read(max(1, -(-q // self.tgroup)), device, pinned)
        vmin, vsc = self.vparams.read(t_end, device, pinned)
        rk = rv = sk = sv = at = None
        if self.ring is not None:
            rk, rv = self.ring.read(self.ring_len, device, pinned)
        if self.sink is not None:
            sk, sv = self.sink.read(self.sink.shape[2], device, pinned)
            at = self.sink_at.to(device)
        return QuantPlanes(qk, qv, kmin, ksc, vmin, vsc, rk, rv, sk, sv, at, self.max_len, q,
                           max(q, t_end - self.window), self.group, self.tgroup,
                           self.scheme == "kivi")

    def _dequant(self, q: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
                 per_channel: bool, out: torch.Tensor | None = None) -> torch.Tensor:
        """Codes q (b, kv, t, hd*bits/8) with fp16 parameters per key group and channel
        (per_channel, (b, kv, t/tgroup, hd)) or per token and head-dim group ((b, kv, t,
        hd/group)) -> (b, kv, t, hd): code * scale + min in fp32, cast to the compute dtype.
        On the CPU it goes CHUNK_VALUES values at a time, so the fp32 intermediates stay in
        the caches (one pass through memory: 4x faster on 2 cores than whole tensors); on
        a GPU at once (values: dequant_triton's fused kernel, through decompress). Written
        into `out` when given."""
        b, kv, t, _ = q.shape
        hd, G = self.head_dim, self.tgroup if per_channel else 1
        if q.device.type != "cpu" and not per_channel and out is None:
            return decompress(Compressed(
                data=q.reshape(-1), mins=m.contiguous().unsqueeze(-1),
                scales=s.contiguous().unsqueeze(-1), shape=(b, kv, t, hd), dim=3,
                bits=self.bits, group_size=self.group, pad=0, dtype=self.dtype))
        if out is None:
            out = torch.empty(b, kv, t, hd, dtype=self.dtype, device=q.device)
        step = t if q.device.type != "cpu" else \
            max(G, CHUNK_VALUES // max(1, b * kv * hd) // G * G)
        for c0 in range(0, t, step):
            c1 = min(t, c0 + step)
            codes = unpack(q[:, :, c0:c1], self.bits)
            if per_channel:
                x = torch.addcmul(m[:, :, c0 // G:c1 // G].float().unsqueeze(3),
                                  codes.reshape(b, kv, (c1 - c0) // G, G, hd),
                                  s[:, :, c0 // G:c1 // G].float().unsqueeze(3))
            else:
                x = torch.addcmul(m[:, :, c0:c1].float().unsqueeze(-1),
                                  codes.reshape(b, kv, c1 - c0, hd // self.group, self.group),
                                  s[:, :, c0:c1].float().unsqueeze(-1))
            out[:, :, c0:c1] = x.reshape(b, kv, c1 - c0, hd)
        return out

    def close(self) -> None:
        for p in self.planes:
            p.close()
