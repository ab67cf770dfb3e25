"""kernels/token_quant.py: new KV rows quantized in one Triton launch give engine/kvquant.py's
torch codes, mins and scales bit for bit (through Triton's interpreter on the CPU, or on
CUDA)."""
from conftest import run_triton_check

CHECK = r"""
import torch
from flexrun.kernels import token_quant
from flexrun.memory.quant import encode, minmax, pack
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)

def torch_ops(x, group):                # engine/kvquant.py _per_token's torch route
    b, kv, s, hd = x.shape
    t = x.float().view(b, kv, s, hd // group, group)
    mins, scales = minmax(t, 4)
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
# a range whose scale rounds apart when divided by 15 (IEEE) or multiplied by the fp32 1/15
# (CUDA's tensor / scalar): both routes must use memory/quant.py's scale_of
x = torch.zeros(1, 1, 1, 32, dtype=torch.float16)
x[..., 0], x[..., 1] = -3.0, 1.8299e-4
x = x.to(dev)
for a, b in zip(token_quant.quantize_tokens(x, 32), torch_ops(x, 32)):
    assert torch.equal(a.view(torch.uint8) if a.dtype == torch.uint8 else a.view(torch.int16),
                       b.view(torch.uint8) if b.dtype == torch.uint8 else b.view(torch.int16))
if dev == "cuda":                       # many groups: a rare rounding split shows up here
    x = (torch.randn(64, 8, 256, 128, generator=g) * torch.rand(64, 8, 256, 1, generator=g)
         * 10).half().to(dev)
    for a, b in zip(token_quant.quantize_tokens(x, 32), torch_ops(x, 32)):
        assert torch.equal(a, b)
print("ok")
"""


def test_token_rows_quantize_as_the_torch_ops():
    run_triton_check(CHECK)
