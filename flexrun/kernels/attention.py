"""Decode attention over a KV slot in Triton: split-K (flash-decoding) with a key range per row.

One new query per row attends to keys [start_row, last] of a batch-major slot (b, kv_heads, T,
hd): the keys of a left-padded prompt begin at `start_row`, and `last` (a device tensor) is the
cache index of the token fed in, so the same launch serves every step of a CUDA graph without
reading the unused tail of the slot. Each program takes one KV head of one row and one split
of the keys; the query heads sharing that KV head ride along (GQA reads K/V once). A second
kernel merges the splits' partial softmaxes (with gpt-oss's per-head sink logits in the
denominator). On the H100, SDPA's masked kernel took 162 us per
OPT-6.7B layer at batch 32 (1.7 TB/s of K/V); see bench/decode_kernels for this one.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:             # CPU-only installs: SDPA with a mask is used
    triton = None

BLOCK_N = 64                    # keys per inner step
TARGET_PROGRAMS = 2048          # enough programs to fill the GPU when rows x KV heads is small
NUM_WARPS = 4
NEG = -1.0e30                   # "minus infinity" that keeps exp() and max() finite

if triton is not None:
    _NEG = tl.constexpr(NEG)

    @triton.jit
    def _split_kernel(Q, K, V, Start, Last, Opart, Mpart, Lpart, scale, softcap,
                      sqb, sqh, skb, skh, skt, svb, svh, svt, CAP: tl.constexpr,
                      KVH: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr,
                      S: tl.constexpr, BN: tl.constexpr, NI: tl.constexpr):
        split_len = NI * BN
        pid = tl.program_id(0)                  # row * KVH + kv head
        sp = tl.program_id(1)                   # split of the keys
        row, kh = (pid // KVH).to(tl.int64), pid % KVH      # 64-bit offsets into big slots
        lo = tl.maximum(sp * split_len, tl.load(Start + row))
        hi = tl.minimum((sp + 1) * split_len, tl.load(Last) + 1)
        g, d, n = tl.arange(0, GP), tl.arange(0, HD), tl.arange(0, BN)
        q = tl.load(Q + row * sqb + (kh * G + g)[:, None] * sqh + d[None, :],
                    mask=(g < G)[:, None], other=0.0)
        m = tl.full([GP], _NEG, tl.float32)
        lsum = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, HD], tl.float32)
        kbase = K + row * skb + kh * skh
        vbase = V + row * svb + kh * svh
        for j in range(NI):
            idx = sp * split_len + j * BN + n
            use = (idx >= lo) & (idx < hi)
            k = tl.load(kbase + idx[:, None] * skt + d[None, :], mask=use[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale                       # (GP, BN) fp32
            if CAP:                             # softcap * tanh(s / softcap), tanh via sigmoid
                s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
            s = tl.where(use[None, :], s, _NEG)
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.where(use[None, :], tl.exp(s - m_new[:, None]), 0.0)
            alpha = tl.exp(m - m_new)
            v = tl.load(vbase + idx[:, None] * svt + d[None, :], mask=use[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            lsum = lsum * alpha + tl.sum(p, 1)
            m = m_new
        heads = pid * G + g                     # = row * heads + kv head * G + g
        keep = g < G
        tl.store(Mpart + heads * S + sp, m, mask=keep)
        tl.store(Lpart + heads * S + sp, lsum, mask=keep)
        tl.store(Opart + (heads * S + sp)[:, None] * HD + d[None, :], acc, mask=keep[:, None])

    @triton.jit
    def _merge_kernel(Opart, Mpart, Lpart, Out, Sink, S: tl.constexpr, SP: tl.constexpr,
                      HD: tl.constexpr, NH: tl.constexpr, SINK: tl.constexpr):
        pid = tl.program_id(0)                  # row * heads + head
        s, d = tl.arange(0, SP), tl.arange(0, HD)
        inside = s < S
        m = tl.load(Mpart + pid * S + s, mask=inside, other=_NEG)
        lsum = tl.load(Lpart + pid * S + s, mask=inside, other=0.0)
        top = tl.max(m, 0)
        if SINK:                                # the head's sink logit joins the denominator
            sink = tl.load(Sink + pid % NH).to(tl.float32)
            top = tl.maximum(top, sink)
        w = tl.where(inside, tl.exp(m - top), 0.0)
        o = tl.load(Opart + (pid * S + s)[:, None] * HD + d[None, :], mask=inside[:, None],
                    other=0.0)
        den = tl.sum(w * lsum, 0)
        if SINK:
            den += tl.exp(sink - top)
        out = tl.sum(o * w[:, None], 0) / den
        tl.store(Out + pid * HD + d, out.to(Out.dtype.element_ty))


def enabled() -> bool:
    """Whether the kernel may be used (FLEXRUN_PLAIN_ATTENTION=1 turns it off)."""
    return triton is not None and os.environ.get("FLEXRUN_PLAIN_ATTENTION", "0") != "1"


def applies(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> bool:
    """q (b, heads, 1, hd) and a slot K, V (b, kv_heads, T, hd) this kernel handles."""
    hd = q.shape[-1]
    return (enabled() and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
            and q.dtype in (torch.float16, torch.bfloat16) and K.dtype == V.dtype == q.dtype
            and 16 <= hd <= 256 and hd & (hd - 1) == 0 and q.shape[1] % K.shape[1] == 0
            and q.stride(-1) == 1 and K.stride(-1) == 1 and V.stride(-1) == 1)


def splits(rows_heads: int, T: int) -> tuple[int, int]:
    """(number of splits, keys per split, a multiple of BLOCK_N) for a slot of T keys."""
    blocks = triton.cdiv(T, BLOCK_N)
    s = max(1, min(blocks, triton.cdiv(TARGET_PROGRAMS, rows_heads)))
    per = triton.cdiv(blocks, s)
    return triton.cdiv(blocks, per), per * BLOCK_N


def decode_attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, start: torch.Tensor,
                     last: torch.Tensor, scale: float | None = None,
                     softcap: float | None = None, sink_logits: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """q (b, heads, 1, hd); K, V (b, kv_heads, T, hd); start (b,) first key of each row;
    last (1,) the last key (inclusive) -> (b, 1, heads*hd); softmax scale 1/sqrt(hd) unless
    given, scores soft-capped (softcap * tanh(s / softcap)) when softcap is given;
    sink_logits (heads,): each head's sink logit in the softmax's denominator (gpt-oss)."""
    b, nh, _, hd = q.shape
    kvh, T = K.shape[1], K.shape[2]
    G = nh // kvh
    S, split_len = splits(b * kvh, T)
    opart = torch.empty((b * nh, S, hd), dtype=torch.float32, device=q.device)
    mpart = torch.empty((b * nh, S), dtype=torch.float32, device=q.device)
    lpart = torch.empty_like(mpart)
    out = torch.empty((b, nh, hd), dtype=q.dtype, device=q.device)
    _split_kernel[(b * kvh, S)](
        q, K, V, start, last, opart, mpart, lpart, hd ** -0.5 if scale is None else scale,
        softcap or 1.0, q.stride(0), q.stride(1), K.stride(0), K.stride(1), K.stride(2),
        V.stride(0), V.stride(1), V.stride(2), CAP=bool(softcap), KVH=kvh, G=G,
        GP=max(16, triton.next_power_of_2(G)), HD=hd, S=S, BN=BLOCK_N, NI=split_len // BLOCK_N,
        num_warps=NUM_WARPS)
    _merge_kernel[(b * nh,)](opart, mpart, lpart, out,
                             mpart if sink_logits is None else sink_logits, S=S,
                             SP=max(2, triton.next_power_of_2(S)), HD=hd, NH=nh,
                             SINK=sink_logits is not None, num_warps=4)
    return out.view(b, 1, nh * hd)
