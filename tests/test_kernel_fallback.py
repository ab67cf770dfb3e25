"""A Triton kernel that fails (a build error on some machine) is dropped for the process with
one line on stderr (kernels/fallback.py), and the call still returns the torch ops' result:
the dummy router's draw (kernels/routing.py) and the new KV rows' quantization
(kernels/token_quant.py)."""
from __future__ import annotations

import pytest
import torch

from flexrun.engine.kvquant import CompressedKVSlot
from flexrun.kernels import routing, token_quant
from flexrun.models import moe


def _draw(x):
    return moe.drawn_experts(x, 8, 2, "uniform")[1:]


def _quantize(x):
    slot = CompressedKVSlot.__new__(CompressedKVSlot)
    slot.group, slot.bits = 32, 4
    return slot._per_token(x)


CASES = {"routing": (routing, "drawn_scores", (5, 32), _draw, lambda x: (x, 8),
                     "drawn-routing kernel failed (RuntimeError: no compiler)"),
         "token_quant": (token_quant, "quantize_tokens", (2, 2, 1, 64), _quantize,
                         lambda x: (x, 32, 4), "token quantization kernel failed (RuntimeError")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_failing_kernel_leaves_the_torch_ops(case, monkeypatch, capsys):
    kernel, launch, shape, call, applies_args, said = CASES[case]
    if kernel.triton is None:
        pytest.skip("no Triton")
    x = torch.randn(*shape).half()
    want = call(x)                              # the torch ops (no interpreter, no CUDA)
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def broken(*a, **k):
        raise RuntimeError("no compiler")
    monkeypatch.setattr(kernel, launch, broken)
    monkeypatch.setattr(kernel.FALLBACK, "errors", [])
    assert kernel.applies(*applies_args(x))
    got = call(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not kernel.applies(*applies_args(x))
    assert said in capsys.readouterr().err


def test_out_of_memory_is_raised_and_the_kernel_kept():
    """An allocation failure is the moment's, not the kernel's: it propagates (the caller's
    out-of-memory handling sees it) and the kernel stays on."""
    from flexrun.kernels.fallback import Fallback
    fb = Fallback("test")

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(torch.OutOfMemoryError):
        fb.run(oom, torch.zeros(1))
    assert fb.on
    assert fb.run(lambda: 7, torch.zeros(1)) == 7
