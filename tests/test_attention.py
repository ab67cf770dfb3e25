"""Grouped-query decode attention (query heads folded onto their KV head) equals attention
with K/V repeated per query head, with and without a padding mask."""
import pytest
import torch
import torch.nn.functional as F

from flexrun.engine.attention import attend


@pytest.mark.parametrize("kvh", [2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_decode_matches_repeated_kv(dtype, kvh):
    """CPU decode attention (batched GEMMs in fp32 / bf16) against SDPA with K/V repeated,
    for grouped (2 KV heads) and plain multi-head (8) attention."""
    g = torch.Generator().manual_seed(0)
    b, nh, T, hd = 3, 8, 17, 16
    # q as the pipeline makes it: (b, s, heads, hd) transposed, not contiguous
    q = torch.randn(b, 1, nh, hd, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(b, kvh, T, hd, generator=g).to(dtype)
    v = torch.randn(b, kvh, T, hd, generator=g).to(dtype)
    mask = torch.rand(b, 1, 1, T, generator=g) > 0.3
    mask[..., -1] = True
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for m in (None, mask):
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(nh // kvh, 1),
                                             v.repeat_interleave(nh // kvh, 1), attn_mask=m)
        ref = ref.transpose(1, 2).reshape(b, 1, nh * hd)
        got = attend(q, k, v, m)
        assert got.shape == ref.shape
        assert (got.float() - ref.float()).abs().max().item() <= tol
    if kvh == nh:
        return
    # a wrong grouping (KV heads interleaved instead of consecutive) would not match
    bad = F.scaled_dot_product_attention(q, k.repeat(1, nh // kvh, 1, 1),
                                         v.repeat(1, nh // kvh, 1, 1))
    bad = bad.transpose(1, 2).reshape(b, 1, nh * hd)
    assert (attend(q, k, v, None).float() - bad.float()).abs().max().item() > 10 * tol
