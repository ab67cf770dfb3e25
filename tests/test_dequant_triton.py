"""The fused Triton dequantization matches quant.decompress_plain bit for bit (fp16).

Runs on CUDA, or on the CPU through Triton's interpreter (TRITON_INTERPRET=1 in a child
process); skipped where Triton is not installed (CPU-only torch wheels do not ship it)."""
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

CHECK = r"""
import torch
from flexrun.quant import compress, decompress, decompress_plain
from flexrun import dequant_triton as dq
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
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
