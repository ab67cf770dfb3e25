"""The fused Triton dequantization matches quant.decompress_plain bit for bit (fp16).

Runs on CUDA, or on the CPU through Triton's interpreter (TRITON_INTERPRET=1 in a child
process); skipped where Triton is not installed (CPU-only torch wheels do not ship it)."""
import pytest

from conftest import run_triton_check

triton = pytest.importorskip("triton")

CHECK = r"""
import torch
from flexrun.memory.quant import compress, decompress, decompress_plain
from flexrun.kernels import dequant as dq
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)
for shape in [(64, 128), (3, 5, 256), (300, 448), (7, 64)]:
    x = (torch.randn(shape, generator=g) * 3).half().to(dev)
    c = compress(x, 4, 64, -1)
    assert dq.supports(c, torch.float16), shape
    assert torch.equal(dq.dequantize4(c, torch.float16), decompress_plain(c, torch.float16))
    assert torch.equal(decompress(c), decompress_plain(c))
assert not dq.supports(compress(torch.randn(10, 100).half().to(dev), 4, 64, -1), torch.float16)
assert not dq.supports(compress(torch.randn(10, 128).half().to(dev), 8, 64, -1), torch.float16)
print("ok")
"""


def test_fused_dequant_matches_plain():
    run_triton_check(CHECK)


MATMUL_CHECK = r"""
import torch
import torch.nn.functional as F
from flexrun.memory.quant import compress, decompress_plain
from flexrun.kernels import dequant as dq
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)
# (rows, out, in, group, bias, config): ragged N and K tails, 1..128 rows, every group size
cases = [(1, 48, 192, 64, True, None), (7, 100, 320, 32, False, (32, 128, 4, 2)),
         (32, 64, 256, 128, True, (64, 256, 4, 3)), (64, 96, 128, 64, False, (64, 128, 4, 4)),
         (17, 33, 448, 64, True, (32, 256, 4, 2)), (100, 80, 256, 64, True, None),
         (128, 300, 64, 32, False, None), (100, 96, 256, 64, True, (128, 64, 8, 4, 128)),
         (128, 70, 384, 64, False, (64, 128, 8, 3, 128)),     # the 128-row tiles
         (1, 48, 192, 64, True, dq.Tiles(64, 128, 4, 2, weight_first=True)),  # weight-first
         (7, 100, 320, 32, False, dq.Tiles(64, 256, 4, 2, weight_first=True)),
         (32, 64, 256, 128, True, dq.Tiles(128, 128, 4, 3, weight_first=True)),
         (100, 80, 448, 64, True, dq.Tiles(64, 256, 4, 3, weight_first=True)),
         (33, 33, 448, 64, False, dq.Tiles(64, 512, 4, 2, None, True))]
for m, n, k, group, has_bias, cfg in cases:
    x = (torch.randn(m, k, generator=g)).half().to(dev)
    w = (torch.randn(n, k, generator=g) * 0.05).half().to(dev)
    b = (torch.randn(n, generator=g) * 0.1).half().to(dev) if has_bias else None
    c = compress(w, 4, group, -1)
    assert dq.fused_linear_ok(x, c), (m, n, k)
    ref = F.linear(x.float(), decompress_plain(c, torch.float16).float(),
                   None if b is None else b.float())
    got = dq.linear4(x.view(m, 1, k), c, b, cfg).view(m, n).float()
    err = (got - ref).abs().max().item()
    assert err <= 2e-2 * ref.abs().max().item() + 1e-3, (m, n, k, err)
    assert got.sum().item() != 0
    wrong = compress(w.flip(0).contiguous(), 4, group, -1)   # the check can fail
    bad = dq.linear4(x, wrong, b, cfg).float()
    assert (bad - ref).abs().max().item() > 10 * max(err, 1e-3)
x = torch.randn(129, 128).half().to(dev)
assert not dq.fused_linear_ok(x, compress(torch.randn(16, 128).half().to(dev), 4, 64, -1))
print("ok")
"""


def test_fused_4bit_matmul_matches_dequantize_then_matmul():
    run_triton_check(MATMUL_CHECK)
