"""The Triton norms (LayerNorm, RMSNorm, with and without the residual add) against torch's.

Runs on CUDA, or on the CPU through Triton's interpreter (TRITON_INTERPRET=1 in a child
process); skipped where Triton is not installed."""
import pytest

from conftest import run_triton_check

triton = pytest.importorskip("triton")

CHECK = r"""
import torch
import torch.nn.functional as F
from flexrun.kernels import norms as norm_triton
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)


def rms_ref(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# Triton's CPU interpreter mishandles bf16 loads: bf16 is checked on CUDA only
for dt in (torch.float16, torch.float32) + ((torch.bfloat16,) if dev == "cuda" else ()):
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}[dt]
    for shape in [(3, 5, 64), (7, 100), (2, 1, 448)]:
        n = shape[-1]
        h = (torch.randn(shape, generator=g) * 2 + 0.5).to(dt).to(dev)
        y = torch.randn(shape, generator=g).to(dt).to(dev)
        w = (torch.rand(n, generator=g) + 0.5).to(dt).to(dev)
        b = (torch.randn(n, generator=g) * 0.1).to(dt).to(dev)
        assert norm_triton.applies(h, w)
        s, ln = norm_triton.norm(h, w, b, 1e-5, False, residual=y)
        assert torch.equal(s, h + y)                 # the sum is rounded as torch rounds it
        ref = F.layer_norm((h + y).float(), (n,), w.float(), b.float(), 1e-5)
        assert (ln.float() - ref).abs().max().item() <= tol * 8, (dt, shape)
        none, ln2 = norm_triton.norm(h, w, b, 1e-5, False)
        assert none is None and ln2.shape == h.shape
        ref2 = F.layer_norm(h.float(), (n,), w.float(), b.float(), 1e-5)
        assert (ln2.float() - ref2).abs().max().item() <= tol * 8
        _, rms = norm_triton.norm(h, w, None, 1e-6, True)
        want = rms_ref(h, w, 1e-6)
        assert (rms.float() - want.float()).abs().max().item() <= tol * 8 * w.float().max()
        wrong = norm_triton.norm(h, w.flip(0).contiguous(), b, 1e-5, False)[1]   # can fail
        assert (wrong.float() - ref2).abs().max().item() > 0.05
print("ok")
"""


def test_triton_norms_match_torch():
    run_triton_check(CHECK)
