"""The synth scheme's clipping-range search in one Triton pass (kernels/quant_search.py)
against torch's (memory/wquant._grid): the same (min, scale) for nearly every group, never
worse than round-to-nearest, as good in all; constant groups (zero scale), an outlier, padded
widths, groups of 32 and 64; quantize() takes it where it applies and gives torch's packed
weights where the picks agree. Runs on CUDA, or on the CPU through Triton's interpreter
(TRITON_INTERPRET=1 in a child process); skipped without Triton."""
import pytest

from conftest import run_triton_check

pytest.importorskip("triton")

CHECK = r"""
import os
import torch
from flexrun.kernels import quant_search
from flexrun.memory import wquant
from flexrun.memory.quant import grouped, minmax
dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
for out, inn, gs in ((48, 200, 64), (40, 96, 32)):
    x = torch.randn(out, inn) * torch.rand(out, 1) * 3
    x[0] = 0.25                           # a constant row: zero scales
    x[1, 5] = 40.0                        # an outlier
    x = x.half().to(dev)
    g, pad = grouped(x, gs, 1)
    imp = torch.rand(inn) + 0.05
    w = torch.cat([imp / imp.mean() + 1e-3, torch.zeros(pad)]).to(dev).view(1, -1, gs)
    assert quant_search.applies(g)
    m, s = quant_search.grid_search(g, w, wquant.GRID, 4)
    m0, s0 = wquant._grid(g, w, 4)
    e, e0 = wquant._err(g, m, s, 4, w), wquant._err(g, m0, s0, 4, w)
    rtn = wquant._err(g, *minmax(g, 4), 4, w)
    assert (e <= rtn * (1 + 1e-6) + 1e-9).all()          # never worse than round-to-nearest
    assert e.sum() <= e0.sum() * (1 + 1e-4)              # as good as torch's search in all
    same = ((m == m0) & (s == s0)).float().mean().item()
    assert same >= 0.98, same             # candidates within an ulp may go either way
    assert (s[0] == 0).all() and (m[0] == 0.25).all()
    # quantize() takes the kernel; with it off, torch's search gives the same packed weights
    c = wquant.quantize(x, 4, gs, "synth", imp.to(dev))
    os.environ["FLEXRUN_TRITON_QUANT"] = "0"
    assert not quant_search.applies(g)
    c0 = wquant.quantize(x, 4, gs, "synth", imp.to(dev))
    del os.environ["FLEXRUN_TRITON_QUANT"]
    if same == 1.0:
        assert torch.equal(c.data, c0.data) and torch.equal(c.mins, c0.mins) and \
            torch.equal(c.scales, c0.scales), "packed weights differ"
print("ok")
"""


def test_grid_search_kernel_matches_torch() -> None:
    run_triton_check(CHECK)
