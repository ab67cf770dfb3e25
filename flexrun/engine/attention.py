"""Attention with padding and causal masks; q (b, heads, s, hd), k/v (b, kv_heads, T, hd)."""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flexrun.models.spec import AttentionOptions

PLAIN = AttentionOptions()
# the score tensors a soft-capped or sunk attention (two matmuls) holds at once: a long
# prefill runs its queries in chunks within this
MATMUL_SCORES_BYTES = 256 << 20


def layer_options(spec, layer: int, w: dict) -> AttentionOptions:
    """How decoder layer `layer` attends (ModelSpec.attention), with its sink logits from its
    weights w where the model has them (gpt-oss)."""
    opts = spec.attention(layer)
    sink = w.get("sinks") if spec.attn_sinks else None
    return opts if sink is None else dataclasses.replace(opts, sink=sink)


def prefill_mask(valid: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """valid: (b, s) bool of real (non-pad) tokens -> (b, 1, s, s) bool attention mask.

    Causal over real keys (and within the last `window` positions); every query also sees
    itself, so pad rows stay finite. A row's tokens are consecutive after its left padding,
    so distances between cache indices are distances between positions."""
    s = valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
    if window is not None:
        causal = causal.triu(-(window - 1))
    eye = torch.eye(s, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]


def decode_mask(valid: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """valid: (b, T) bool of real keys (the new token included) -> (b, 1, 1, T), keys within
    the last `window` positions only when a window is given."""
    if window is not None:
        T = valid.shape[1]
        recent = torch.arange(T, device=valid.device) > T - 1 - window
        valid = valid & recent
    return valid[:, None, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           causal: bool = False, opts: AttentionOptions = PLAIN) -> torch.Tensor:
    """Grouped-query attention when kv_heads < heads -> (b, s, heads*hd).

    mask None means no padding: plain causal (prefill) or full (decode) attention, which
    lets SDPA pick its fastest kernel. A window must already be in the mask; a soft cap or
    sinks run as two matmuls (SDPA has neither)."""
    b, nh, s, hd = q.shape
    if opts.softcap is not None or opts.sink is not None:
        T, kvh = k.shape[2], k.shape[1]
        if mask is None and causal:
            mask = torch.ones(s, T, dtype=torch.bool, device=q.device).tril(T - s)[None, None]
        g = nh // kvh
        # the fp32 scores (and the softmax's copies of them) of a few queries at a time
        step = max(1, MATMUL_SCORES_BYTES // (b * nh * T * 4 * 3))
        outs = []
        for j in range(0, s, step):
            qj = q[:, :, j:j + step]
            sj = qj.shape[2]
            mj = None if mask is None else mask[..., j:j + sj, :] if mask.shape[2] > 1 else mask
            outs.append(_matmul_attention(qj.reshape(b, kvh, g * sj, hd), k, v,
                                          _fold_mask(mj, g, sj), opts).view(b, nh, sj, hd))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
        return out.transpose(1, 2).reshape(b, s, nh * hd)
    if s == 1 and not causal and q.device.type == "cpu":
        # decode on the CPU: fold the GQA heads (CPU SDPA with enable_gqa: 151 vs 22 ms fp16,
        # 16 x 64 heads / 8 KV x 544 keys, 2 cores). On CUDA, where flash attention takes GQA
        # as is, the fold measured no gain (Llama-70B decode 177 vs 147-158 ms/step)
        return attend_slot(q, k, v, mask, opts)
    gqa = k.shape[1] != nh
    if causal and mask is None and q.is_cuda and opts.scale is None:
        out = causal_sdpa(q, k, v, gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=opts.scale,
                                             is_causal=causal and mask is None, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(b, s, nh * hd)


_CUDNN_FIRST = os.environ.get("FLEXRUN_CUDNN_ATTENTION", "1") == "1"


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
    """Causal SDPA on CUDA (an unpadded prefill), cuDNN's kernel first where it applies:
    0.198 against 0.361 ms for flash attention at 32 x 32 heads x 512 x 128 (fp16, H100),
    with the same output (bench/prefill_probe.py). Unsupported shapes fall through to
    flash / memory-efficient attention; FLEXRUN_CUDNN_ATTENTION=0 keeps SDPA's own order."""
    global _CUDNN_FIRST
    if _CUDNN_FIRST:
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        try:
            with sdpa_kernel(order, set_priority=True):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        except TypeError:       # a torch without set_priority (before 2.6)
            _CUDNN_FIRST = False
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


def _fold_mask(mask: torch.Tensor | None, g: int, s: int) -> torch.Tensor | None:
    """A (b|1, 1, s, T) mask for queries folded as (b, kv_heads, g*s, hd): row i*s + j is
    query j of the i-th head sharing the KV head."""
    if mask is None:
        return None
    return mask.expand(mask.shape[0], 1, s, mask.shape[-1]).repeat(1, 1, g, 1)


def attend_slot(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None, opts: AttentionOptions = PLAIN) -> torch.Tensor:
    """Decode attention, one query per row: q (b, heads, 1, hd) -> (b, 1, heads*hd).

    The query heads sharing a KV head become that KV head's queries, so K/V are never
    repeated per query head and any mask (b, 1, 1, T) applies as is (the static decode step
    of CUDA graphs attends over a whole slot with it)."""
    b, nh, _, hd = q.shape
    kvh = k.shape[1]
    q = q.reshape(b, kvh, nh // kvh, hd)
    if opts.softcap is not None or opts.sink is not None or (host_matmul(q) and (
            q.dtype == torch.float32 or (k.is_contiguous() and v.is_contiguous()))):
        out = _matmul_attention(q, k, v, mask, opts)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=opts.scale)
    return out.reshape(b, 1, nh * hd)


def host_matmul(q: torch.Tensor) -> bool:
    """Decode attention on the CPU in fp32 / bf16 runs as two batched GEMMs: 1.1 against
    7.5 ms for SDPA in bf16 (1.2 / 2.5 in fp32), 16 rows x 32 heads x 130 keys, 2 cores. fp16
    keeps SDPA: CPUs without fp16 GEMM kernels run it ~8x slower as matmuls. bf16 over a
    slot's prefix views (strided batches) keeps SDPA too: the GEMMs there took 36 against
    19 ms (520 keys); CPU runs attend over whole slots instead (Pipeline._whole_slot)."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)


def _matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None, opts: AttentionOptions = PLAIN) -> torch.Tensor:
    """softmax(q k^T * scale) v as HF's eager attention computes it: scores in the run's
    dtype (soft-capped as Gemma-2's), the softmax in fp32 (with each head's sink logit as
    one more column, dropped after: gpt-oss). q (b, h, g, hd) against k / v (b, h, T, hd),
    the g query rows of KV head h being query heads h * G + i (G = heads / kv heads) for
    their s = g / G positions each."""
    scale = q.shape[-1] ** -0.5 if opts.scale is None else opts.scale
    if opts.softcap is None:
        scores = torch.matmul(q * scale, k.transpose(-1, -2)).float()
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        scores = (torch.tanh(scores / opts.softcap) * opts.softcap).float()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if opts.sink is None:
        return torch.matmul(scores.softmax(-1).to(q.dtype), v)
    b, kvh, rows, _ = scores.shape
    G = opts.sink.numel() // kvh
    col = opts.sink.to(scores.device, torch.float32).view(1, kvh, G, 1)
    col = col.expand(b, kvh, G, rows // G).reshape(b, kvh, rows, 1)
    probs = torch.cat([scores, col], -1).softmax(-1)[..., :-1]
    return torch.matmul(probs.to(q.dtype), v)


def attend_range(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, start: torch.Tensor,
                 last: torch.Tensor, opts: AttentionOptions = PLAIN) -> torch.Tensor:
    """Decode attention of q (b, heads, 1, hd) over keys [start[row], last] of whole slots K, V
    (b, kv_heads, T, hd) -> (b, 1, heads*hd); start (b,) and last (1,) are device tensors, so
    shapes do not change from step to step. On CUDA a Triton split-K kernel reads only the
    keys in range (attn_triton); elsewhere SDPA runs over the slot with a mask."""
    from flexrun.kernels import attention as attn_triton
    if opts.window is not None:                 # a window only moves each row's first key
        start = torch.maximum(start, last - (opts.window - 1))
    if attn_triton.applies(q, K, V):
        return attn_triton.decode_attention(q, K, V, start, last, opts.scale, opts.softcap,
                                            opts.sink)
    pos = torch.arange(K.shape[2], device=K.device)
    mask = ((pos >= start[:, None]) & (pos <= last))[:, None, None, :]
    return attend_slot(q, K, V, mask, opts)


def attend_stored(q: torch.Tensor, slot, t_end: int, key_range: tuple[torch.Tensor, torch.Tensor],
                  mask, opts: AttentionOptions = PLAIN, pinned: bool = False) -> torch.Tensor:
    """Decode attention of q over positions [0, t_end) of a KV slot on q's device: a 4-bit
    slot (CompressedKVSlot) through the fused kernel that dequantizes in registers
    (kernels/qattention.py) where it applies, else the slot read to dense K and V and
    attended with `mask` (a callable: built only then). key_range: (start, last) as
    attend_range takes them."""
    from flexrun.kernels import qattention
    planes = slot.quant_planes(t_end, q.device, pinned)
    if planes is not None and qattention.applies(q, planes):
        start, last = key_range
        if opts.window is not None:             # a window only moves each row's first key
            start = torch.maximum(start, last - (opts.window - 1))
        return qattention.decode_qattention(q, planes, start, last, opts.scale, opts.softcap,
                                            opts.sink)
    K, V = slot.read(t_end, q.device, pinned) if planes is None else \
        slot.read(t_end, q.device, pinned, planes)
    return attend(q, K, V, mask(), opts=opts)
