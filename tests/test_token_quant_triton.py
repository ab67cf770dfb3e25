"""kernels/token_quant.py: new KV rows quantized in one Triton launch give engine/kvquant.py's
torch codes, mins and scales bit for bit (through Triton's interpreter on the CPU, or on
CUDA)."""
from conftest import run_triton_check

CHECK = r"""
import torch
from flexrun.kernels import token_quant
from flexrun.memory.quant import encode, pack
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)

def torch_ops(x, group):                # engine/kvquant.py _per_token's torch route
    b, kv, s, hd = x.shape
    t = x.float().view(b, kv, s, hd // group, group)
    mn, mx = t.amin(-1, keepdim=True), t.amax(-1, keepdim=True)
    mins, scales = mn.half(), ((mx - mn) / 15).half()
    q = encode(t, mins, scales, 4).view(b, kv, s, hd)
    return pack(q, 4), mins[..., 0], scales[..., 0]

checked = 0
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    for shape, group in (((3, 2, 1, 64), 32), ((2, 4, 5, 128), 64), ((1, 1, 2, 16), 16),
                         ((2, 2, 1, 128), 128)):
        x = (torch.randn(*shape, generator=g) * 3).to(dtype)
        x[0, 0, 0, :group] = 1.5                # a constant group: scale 0, codes 0
        x = x.to(dev).transpose(1, 2).contiguous().transpose(1, 2)   # as the model's v
        assert token_quant.applies(x, group, 4)
        got = token_quant.quantize_tokens(x, group)
        want = torch_ops(x, group)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape)
            assert torch.equal(a, b), (dtype, shape, group)
        checked += 1
assert checked == 12
print("ok")
"""


def test_token_rows_quantize_as_the_torch_ops():
    run_triton_check(CHECK)
