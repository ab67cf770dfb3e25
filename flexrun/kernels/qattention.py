"""Decode attention over a 4-bit KV slot in Triton, dequantizing in registers.

The split-K kernel of kernels/attention.py, reading a compressed slot's planes
(engine/kvquant.py) instead of dense K and V: each block of keys is taken, per position, from
the 4-bit codes and their fp16 parameters (keys per channel over `token_group` positions
under kivi, else per token and head-dim group; values per token and head-dim group), from the
exact ring of recent positions, or from the exact sink tokens of the row, then dequantized
(code * scale + min in fp32, cast to the compute dtype, as CompressedKVSlot.read does) and
attended. The dense K and V are never written: a step reads the 4-bit codes, not the
dequantized cache twice over (written, then read by the attention).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from flexrun.kernels import attention as dense

triton, tl = dense.triton, (dense.tl if dense.triton is not None else None)


@dataclass
class QuantPlanes:
    """A compressed slot's planes on the attending device, for positions [0, t_end)."""
    k_codes: torch.Tensor           # (b, kv, T, hd/2) uint8
    v_codes: torch.Tensor
    k_min: torch.Tensor             # kivi: (b, kv, T/token_group, hd); else (b, kv, T, hd/g)
    k_scale: torch.Tensor
    v_min: torch.Tensor             # (b, kv, T, hd/group)
    v_scale: torch.Tensor
    ring_k: torch.Tensor | None     # (b, kv, R, hd) exact K / V of position p at p % R
    ring_v: torch.Tensor | None
    sink_k: torch.Tensor | None     # (b, kv, S, hd) exact K / V of each row's first tokens
    sink_v: torch.Tensor | None
    sink_at: torch.Tensor | None    # (b, S) their positions (contiguous, the last repeated)
    capacity: int                   # the slot's positions (splits are sized for it, so a
    #                                 kernel is built once per slot shape, not per step)
    quantized_keys: int             # keys below this position come from the codes
    quantized_values: int           # values below this position come from the codes
    group: int                      # values per group along the head dim
    token_group: int                # keys per group along positions (kivi), else 1
    kivi: bool


if triton is not None:
    _NEG = tl.constexpr(dense.NEG)

    @triton.jit
    def _load_kv(C, MIN, SCL, RING, SINK, base_c, base_p, base_r, base_s, idx, d, quant,
                 ring, sink, sink_i, sct, spt, srt, sst, R, TG: tl.constexpr,
                 GRP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_RING: tl.constexpr,
                 HAS_SINK: tl.constexpr, OUT_T: tl.constexpr):
        """One block of keys or values (BN, HD) in the compute dtype, each position from
        its source: the codes (dequantized), the ring or the sinks."""
        byte = tl.load(C + base_c + idx[:, None] * sct + (d // 2)[None, :], mask=quant[:, None],
                       other=0).to(tl.int32)
        code = ((byte >> ((d % 2) * 4)[None, :]) & 15).to(tl.float32)
        if PER_CHANNEL:
            p_at = (idx // TG)[:, None] * spt + d[None, :]
        else:
            p_at = idx[:, None] * spt + (d // GRP)[None, :]
        mn = tl.load(MIN + base_p + p_at, mask=quant[:, None], other=0.0).to(tl.float32)
        sc = tl.load(SCL + base_p + p_at, mask=quant[:, None], other=0.0).to(tl.float32)
        x = (mn + code * sc).to(OUT_T)
        if HAS_RING:
            r = tl.load(RING + base_r + (idx % R)[:, None] * srt + d[None, :],
                        mask=ring[:, None], other=0.0)
            x = tl.where(ring[:, None], r, x)
        if HAS_SINK:
            s = tl.load(SINK + base_s + sink_i[:, None] * sst + d[None, :], mask=sink[:, None],
                        other=0.0)
            x = tl.where(sink[:, None], s, x)
        return x

    @triton.jit(do_not_specialize=["qk_end", "qv_end", "R"])
    def _qsplit_kernel(Q, KC, VC, KMIN, KSC, VMIN, VSC, RK, RV, SK, SV, Start, Last, SinkLo,
                       SinkHi, Opart, Mpart, Lpart, scale, softcap, qk_end, qv_end, R,
                       sqb, sqh, scb, sch, sct, skpb, skph, skpt, svpb, svph, svpt,
                       srb, srh, srt, ssb, ssh, sst,
                       CAP: tl.constexpr, KVH: tl.constexpr, G: tl.constexpr,
                       GP: tl.constexpr, HD: tl.constexpr, S: tl.constexpr, BN: tl.constexpr,
                       NI: tl.constexpr, TG: tl.constexpr, GRP: tl.constexpr,
                       KIVI: tl.constexpr, HAS_RING: tl.constexpr, HAS_SINK: tl.constexpr):
        split_len = NI * BN
        pid = tl.program_id(0)                  # row * KVH + kv head
        sp = tl.program_id(1)                   # split of the keys
        row, kh = (pid // KVH).to(tl.int64), pid % KVH
        lo = tl.maximum(sp * split_len, tl.load(Start + row))
        hi = tl.minimum((sp + 1) * split_len, tl.load(Last) + 1)
        g, d, n = tl.arange(0, GP), tl.arange(0, HD), tl.arange(0, BN)
        q = tl.load(Q + row * sqb + (kh * G + g)[:, None] * sqh + d[None, :],
                    mask=(g < G)[:, None], other=0.0)
        out_t = Q.dtype.element_ty
        m = tl.full([GP], _NEG, tl.float32)
        lsum = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, HD], tl.float32)
        base_c = row * scb + kh * sch
        base_kp, base_vp = row * skpb + kh * skph, row * svpb + kh * svph
        base_r, base_s = row * srb + kh * srh, row * ssb + kh * ssh
        if HAS_SINK:
            s_lo, s_hi = tl.load(SinkLo + row), tl.load(SinkHi + row)
        else:
            s_lo, s_hi = 0, -1
        for j in range(NI):
            idx = (sp * split_len + j * BN + n).to(tl.int64)   # 64-bit: time-major planes
            use = (idx >= lo) & (idx < hi)
            sink = use & (idx >= s_lo) & (idx <= s_hi)
            rest = use & ~sink
            k = _load_kv(KC, KMIN, KSC, RK, SK, base_c, base_kp, base_r, base_s, idx, d,
                         rest & (idx < qk_end), rest & (idx >= qk_end), sink, idx - s_lo,
                         sct, skpt, srt, sst, R, TG, GRP, KIVI, HAS_RING, HAS_SINK, out_t)
            s = tl.dot(q, tl.trans(k)) * scale                       # (GP, BN) fp32
            if CAP:
                s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
            s = tl.where(use[None, :], s, _NEG)
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.where(use[None, :], tl.exp(s - m_new[:, None]), 0.0)
            alpha = tl.exp(m - m_new)
            v = _load_kv(VC, VMIN, VSC, RV, SV, base_c, base_vp, base_r, base_s, idx, d,
                         rest & (idx < qv_end), rest & (idx >= qv_end), sink, idx - s_lo,
                         sct, svpt, srt, sst, R, TG, GRP, False, HAS_RING, HAS_SINK, out_t)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            lsum = lsum * alpha + tl.sum(p, 1)
            m = m_new
        heads = pid * G + g
        keep = g < G
        tl.store(Mpart + heads * S + sp, m, mask=keep)
        tl.store(Lpart + heads * S + sp, lsum, mask=keep)
        tl.store(Opart + (heads * S + sp)[:, None] * HD + d[None, :], acc, mask=keep[:, None])


def applies(q: torch.Tensor, planes: QuantPlanes) -> bool:
    """Whether this kernel handles q (b, heads, 1, hd) over `planes`: 4-bit codes, a head
    dim the dense kernel takes, value groups that divide it, on CUDA (or the interpreter)."""
    hd, k = q.shape[-1], planes.k_codes
    return (dense.enabled() and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
            and q.dtype in (torch.float16, torch.bfloat16) and q.stride(-1) == 1
            and 16 <= hd <= 256 and hd & (hd - 1) == 0 and q.shape[1] % k.shape[1] == 0
            and k.shape[-1] * 2 == hd and hd % planes.group == 0
            and all(t.stride(-1) == 1 for t in (k, planes.v_codes, planes.k_min,
                                                planes.k_scale, planes.v_min, planes.v_scale))
            and planes.k_codes.stride() == planes.v_codes.stride()
            and planes.k_min.stride() == planes.k_scale.stride()
            and planes.v_min.stride() == planes.v_scale.stride()
            and all(a is None or (a.stride() == b.stride() and a.stride(-1) == 1
                                  and a.dtype == b.dtype == q.dtype)
                    for a, b in ((planes.ring_k, planes.ring_v),
                                 (planes.sink_k, planes.sink_v))))


def decode_qattention(q: torch.Tensor, planes: QuantPlanes, start: torch.Tensor,
                      last: torch.Tensor, scale: float | None = None,
                      softcap: float | None = None, sink_logits: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """q (b, heads, 1, hd) attending keys [start[row], last] of a compressed slot's planes
    -> (b, 1, heads*hd), as kernels.attention.decode_attention does over dense K and V
    (sink_logits: its per-head sink logits, gpt-oss; not the cache's exact sink tokens)."""
    b, nh, _, hd = q.shape
    kvh, T = planes.k_codes.shape[1], planes.capacity
    G = nh // kvh
    S, split_len = dense.splits(b * kvh, T)
    opart = torch.empty((b * nh, S, hd), dtype=torch.float32, device=q.device)
    mpart = torch.empty((b * nh, S), dtype=torch.float32, device=q.device)
    lpart = torch.empty_like(mpart)
    out = torch.empty((b, nh, hd), dtype=q.dtype, device=q.device)
    ring, sink = planes.ring_k is not None, planes.sink_k is not None
    rk = planes.ring_k if ring else q
    rv = planes.ring_v if ring else q
    sk = planes.sink_k if sink else q
    sv = planes.sink_v if sink else q
    lo_hi = (planes.sink_at[:, 0].contiguous(), planes.sink_at[:, -1].contiguous()) if sink \
        else (start, start)
    _qsplit_kernel[(b * kvh, S)](
        q, planes.k_codes, planes.v_codes, planes.k_min, planes.k_scale, planes.v_min,
        planes.v_scale, rk, rv, sk, sv, start, last, *lo_hi, opart, mpart, lpart,
        hd ** -0.5 if scale is None else scale, softcap or 1.0, planes.quantized_keys,
        planes.quantized_values, rk.shape[2] if ring else 1,
        q.stride(0), q.stride(1), *planes.k_codes.stride()[:3], *planes.k_min.stride()[:3],
        *planes.v_min.stride()[:3], *(rk.stride()[:3] if ring else (0, 0, 0)),
        *(sk.stride()[:3] if sink else (0, 0, 0)),
        CAP=bool(softcap), KVH=kvh, G=G, GP=max(16, triton.next_power_of_2(G)), HD=hd, S=S,
        BN=dense.BLOCK_N, NI=split_len // dense.BLOCK_N, TG=planes.token_group,
        GRP=planes.group, KIVI=planes.kivi, HAS_RING=ring, HAS_SINK=sink,
        num_warps=dense.NUM_WARPS)
    dense._merge_kernel[(b * nh,)](opart, mpart, lpart, out,
                                   mpart if sink_logits is None else sink_logits, S=S,
                                   SP=max(2, triton.next_power_of_2(S)), HD=hd, NH=nh,
                                   SINK=sink_logits is not None, num_warps=4)
    return out.view(b, 1, nh * hd)
