"""kernels/routing.py: a dummy MoE router's drawn scores in one Triton launch give the torch
ops' experts (through Triton's interpreter on the CPU, or on CUDA)."""
from conftest import run_triton_check

CHECK = r"""
import torch
from flexrun.kernels import routing
from flexrun.models import moe
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)
checked = 0
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    for hidden, E, k in ((64, 8, 2), (8, 128, 8), (48, 60, 4)):
        x = torch.randn(37, hidden, generator=g).to(dtype).to(dev)
        for route in ("uniform", "zipf:1.2"):
            assert routing.applies(x, E)
            w, idx = moe.drawn_experts(x, E, k, route, seed=3)
            routing.triton = None               # the torch ops
            try:
                w0, idx0 = moe.drawn_experts(x, E, k, route, seed=3)
            finally:
                import triton
                routing.triton = triton
            assert torch.equal(w, w0)
            same = (idx.sort(-1).values == idx0.sort(-1).values).all(-1).float().mean().item()
            assert same == 1.0, (dtype, hidden, E, route, same)
            checked += 1
assert checked == 18
print("ok")
"""


def test_drawn_scores_pick_the_torch_ops_experts():
    run_triton_check(CHECK)
