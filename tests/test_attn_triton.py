"""The Triton split-K decode attention matches SDPA over the same key ranges.

Runs on CUDA, or on the CPU through Triton's interpreter (TRITON_INTERPRET=1 in a child
process); skipped where Triton is not installed."""
import pytest

from conftest import run_triton_check

triton = pytest.importorskip("triton")

CHECK = r"""
import torch
from flexrun.kernels import attention as attn_triton
from flexrun.engine.attention import attend_slot
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)

def ref(q, K, V, start, last):
    pos = torch.arange(K.shape[2])
    mask = ((pos >= start[:, None]) & (pos <= last))[:, None, None, :]
    return attend_slot(q.float(), K.float(), V.float(), mask)

# rows, heads, kv heads, slot length, head dim, last key; splits: one, several, GQA, tail unused
for b, nh, kvh, T, hd, last in [(3, 4, 4, 70, 16, 50), (2, 8, 2, 200, 32, 199),
                                (5, 6, 3, 300, 64, 40), (1, 4, 1, 130, 128, 129)]:
    q = torch.randn(b, nh, 1, hd, generator=g).half()
    K = torch.randn(b, kvh, T, hd, generator=g).half()
    V = torch.randn(b, kvh, T, hd, generator=g).half()
    K[:, :, last + 1:] = 300.0              # keys past `last` must not count
    start = torch.randint(0, min(last, 30) + 1, (b,), generator=g)
    start[0] = 0
    want = ref(q, K, V, start, torch.tensor([last]))
    args = [x.to(dev) for x in (q, K, V, start, torch.tensor([last]))]
    assert attn_triton.applies(*args[:3])
    got = attn_triton.decode_attention(*args).float().cpu()
    err = (got - want).abs().max().item()
    assert err < 3e-3, (b, nh, kvh, T, hd, last, err)
    V2 = args[2].clone()
    V2[0, 0, last] += 1.0                   # a key in range must count
    moved = (attn_triton.decode_attention(args[0], args[1], V2, *args[3:]).float().cpu()
             - got).abs().max().item()
    assert moved > 1e-3, moved
    # a slot from a transposed (time-major) buffer: strided K/V
    Kt = args[1].permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    Vt = args[2].permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    got_t = attn_triton.decode_attention(args[0], Kt, Vt, *args[3:]).float().cpu()
    assert (got_t - got).abs().max().item() < 1e-6, (got_t - got).abs().max().item()
for rows_heads, T in [(1024, 544), (8, 544), (6144, 544), (1, 64), (32, 4000)]:
    S, per = attn_triton.splits(rows_heads, T)
    assert per % attn_triton.BLOCK_N == 0 and (S - 1) * per < T <= S * per, (rows_heads, T)
assert attn_triton.splits(8, 544)[0] == 9       # few rows: one split per key block
# sinks (gpt-oss): each head's logit in the denominator, as the matmul route adds it
from flexrun.models.spec import AttentionOptions
b, nh, kvh, T, hd, last = 3, 8, 2, 300, 64, 150
q = torch.randn(b, nh, 1, hd, generator=g).half()
K, V = (torch.randn(b, kvh, T, hd, generator=g).half() for _ in range(2))
start = torch.tensor([0, 20, 140])
sink = torch.tensor([-30.0, 0.0, 2.0, 5.0, -1.0, 0.5, 30.0, 1.0])    # 30: above every score
pos = torch.arange(T)
mask = ((pos >= start[:, None]) & (pos <= last))[:, None, None, :]
want = attend_slot(q.float(), K.float(), V.float(), mask, AttentionOptions(sink=sink))
args = [x.to(dev) for x in (q, K, V, start, torch.tensor([last]))]
got = attn_triton.decode_attention(*args, sink_logits=sink.to(dev)).float().cpu()
assert (got - want).abs().max().item() < 3e-3, (got - want).abs().max().item()
plain = attn_triton.decode_attention(*args).float().cpu()
assert (plain - got).abs().max().item() > 1e-2
K24 = torch.zeros(1, 4, 8, 24, dtype=torch.half, device=dev)
assert not attn_triton.applies(torch.zeros(1, 4, 1, 24, dtype=torch.half, device=dev), K24, K24)
print("ok")
"""


def test_decode_attention_matches_sdpa():
    run_triton_check(CHECK)
