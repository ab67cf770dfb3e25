"""Group-wise min-max quantization: accuracy, exactness, sizes, layouts, dtypes, devices."""
from __future__ import annotations

import pytest
import torch

from flexrun.memory.quant import Compressed, compress, compressed_nbytes, decompress


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean() / b.pow(2).mean()).sqrt().item()


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_gaussian_error():
    x = gaussian(256, 1024)
    e4 = rel_rms(decompress(compress(x, 4, 64)), x)
    e8 = rel_rms(decompress(compress(x, 8, 64)), x)
    print(f"relative RMS error, group 64: 4-bit {e4:.4f}, 8-bit {e8:.5f}")
    assert e4 < 0.1
    assert e8 < e4 / 10


def test_error_is_bounded_by_half_step():
    x = gaussian(64, 256, seed=1)
    for bits in (4, 8):
        c = compress(x, bits, 32)
        err = (decompress(c) - x).abs().view(64, 8, 32)
        # half a step, plus slack for the fp16-rounded min/scale
        bound = c.scales.float() * 0.5 + 2e-3 * x.abs().max()
        assert (err <= bound).all()


def levels_tensor(rows: int, groups: int, bits: int, step: float, lo: float, seed: int = 0):
    """Every group holds all 2**bits levels lo + k*step (k shuffled, repeated)."""
    g = torch.Generator().manual_seed(seed)
    n = 2 ** bits
    size = max(n, 64)
    k = torch.stack([torch.randperm(size, generator=g) % n for _ in range(rows * groups)])
    return (lo + k.float() * step).view(rows, groups * size), size


@pytest.mark.parametrize("bits,step,lo", [(4, 0.25, 0.0), (4, 0.5, -3.0), (4, 1 / 64, 1.5),
                                          (8, 0.25, -32.0), (8, 2.0 ** -6, 0.125)])
def test_exact_round_trip_evenly_spaced(bits, step, lo):
    x, size = levels_tensor(8, 4, bits, step, lo)
    c = compress(x, bits, size)
    assert torch.equal(decompress(c), x)


def test_exact_round_trip_fewer_values_in_full_range():
    # only some of the 16 levels present, but min and max span the whole range
    g = torch.Generator().manual_seed(3)
    k = torch.randint(0, 16, (32, 128), generator=g)
    k[:, ::64] = 0
    k[:, 1::64] = 15
    x = k.float() * 0.25 - 1.0
    assert torch.equal(decompress(compress(x, 4, 64)), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_exact_round_trip_keeps_dtype(dtype):
    x, size = levels_tensor(4, 2, 4, 0.25, -2.0)
    x = x.to(dtype)
    y = decompress(compress(x, 4, size))
    assert y.dtype == dtype
    assert torch.equal(y, x)


@pytest.mark.parametrize("value", [0.0, 3.5, -1.25, 1024.0])
@pytest.mark.parametrize("bits", [4, 8])
def test_constant_round_trip(value, bits):
    x = torch.full((6, 100), value)
    c = compress(x, bits, 64)
    assert (c.scales == 0).all()
    assert torch.equal(decompress(c), x)


def test_constant_groups_among_varying_ones():
    x = gaussian(4, 128, seed=2)
    x[1, :64] = 0.75
    y = decompress(compress(x, 4, 64))
    assert torch.equal(y[1, :64], x[1, :64])
    assert rel_rms(y, x) < 0.1


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(256, 512), (3, 70), (5, 7, 33), (1, 64), (1000,)])
def test_packed_size(bits, shape):
    c = compress(gaussian(*shape), bits, 64)
    ngroups = c.mins.numel()
    assert c.scales.numel() == ngroups
    assert ngroups == (torch.Size(shape).numel() // shape[-1]) * -(-shape[-1] // 64)
    codes = ngroups * 64
    assert c.data.dtype == torch.uint8 and c.mins.dtype == c.scales.dtype == torch.float16
    assert c.data.numel() == codes * bits // 8
    assert c.nbytes == codes * bits // 8 + 4 * ngroups
    assert c.nbytes == compressed_nbytes(shape, bits, 64)


def test_packed_size_unpadded_4bit():
    x = gaussian(128, 256)
    c = compress(x, 4, 64)
    assert c.pad == 0
    assert c.nbytes == x.numel() // 2 + 4 * (x.numel() // 64)


def test_low_nibble_first():
    x = torch.tensor([0.0, 15.0, 3.0, 7.0])   # min 0, max 15 -> scale 1, codes = values
    c = compress(x, 4, 4)
    assert c.data.tolist() == [0 | 15 << 4, 3 | 7 << 4]


@pytest.mark.parametrize("shape,dim", [((3, 70), 0), ((3, 70), 1), ((3, 70), -1),
                                       ((5, 7, 33), 0), ((5, 7, 33), 1), ((5, 7, 33), -1),
                                       ((5, 7, 33), -2), ((130, 4), 0)])
@pytest.mark.parametrize("bits", [4, 8])
def test_odd_shapes_and_dims(shape, dim, bits):
    x = gaussian(*shape, seed=4)
    c = compress(x, bits, 64, dim=dim)
    assert c.dim == dim % len(shape) and c.shape == shape
    assert c.pad == -shape[dim] % 64
    assert c.nbytes == compressed_nbytes(shape, bits, 64, dim)
    y = decompress(c)
    assert y.shape == x.shape and y.is_contiguous()
    assert rel_rms(y, x) < (0.1 if bits == 4 else 0.01)


def test_groups_run_along_dim():
    # constant along dim 0, varying across dim 1: grouping along dim 0 must be exact
    x = gaussian(1, 48).half().float().expand(128, 48).contiguous()
    assert torch.equal(decompress(compress(x, 4, 64, dim=0)), x)
    assert not torch.equal(decompress(compress(x, 4, 16, dim=1)), x)


def test_odd_group_size_4bit():
    x = gaussian(3, 5)
    c = compress(x, 4, 3)                 # 3 rows * 2 groups * 3 = 18 codes -> 9 bytes
    assert c.data.numel() == 9 and decompress(c).shape == (3, 5)
    c = compress(gaussian(5), 4, 5)       # 5 codes -> 3 bytes (odd nibble padded)
    assert c.data.numel() == 3 and c.nbytes == compressed_nbytes((5,), 4, 5)
    y = decompress(c)
    assert y.shape == (5,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_kept_and_override(dtype):
    x = gaussian(16, 96).to(dtype)
    c = compress(x, 4, 64)
    assert c.dtype == dtype
    y = decompress(c)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_rms(y, x) < 0.1
    assert decompress(c, torch.float32).dtype == torch.float32
    assert torch.equal(decompress(c, torch.float32).to(dtype), y)


def test_to_and_pin_memory_cpu():
    c = compress(gaussian(8, 64), 4, 64)
    d = c.to("cpu")
    assert isinstance(d, Compressed) and torch.equal(decompress(d), decompress(c))
    if torch.cuda.is_available():
        p = c.pin_memory()
        assert p.data.is_pinned() and p.mins.is_pinned() and p.scales.is_pinned()


def test_invalid_arguments():
    with pytest.raises(ValueError):
        compress(gaussian(4, 4), bits=3)
    with pytest.raises(ValueError):
        compress(gaussian(4, 4), group_size=0)
    with pytest.raises(TypeError):
        compress(torch.ones(4, 4, dtype=torch.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,dim", [((256, 1024), -1), ((5, 7, 33), 1), ((3, 70), 0)])
def test_cuda_matches_cpu(bits, dtype, shape, dim):
    x = gaussian(*shape, seed=5).to(dtype)
    cc = compress(x, bits, 64, dim)
    cg = compress(x.cuda(), bits, 64, dim)
    assert cg.data.is_cuda and cg.pad == cc.pad and cg.dim == cc.dim
    assert torch.equal(cg.data.cpu(), cc.data)
    assert torch.equal(cg.mins.cpu().view(torch.int16), cc.mins.view(torch.int16))
    assert torch.equal(cg.scales.cpu().view(torch.int16), cc.scales.view(torch.int16))
    yg = decompress(cg)
    assert yg.is_cuda
    assert torch.equal(yg.cpu(), decompress(cc))
    # moving between devices keeps the payload
    assert torch.equal(decompress(cc.to("cuda", non_blocking=True)).cpu(), decompress(cc))
    assert torch.equal(decompress(cg.to("cpu")), decompress(cc))


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_and_encode_match_compress(bits):
    from flexrun.memory.quant import encode, from_codes, grouped, minmax, pack, unpack
    x = gaussian(6, 128, seed=7)
    q = torch.randint(0, 2 ** bits, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack(pack(q, bits), bits), q)
    g, pad = grouped(x, 32, 1)
    mins, scales = minmax(g, bits)
    c = from_codes(encode(g, mins, scales, bits), mins, scales, x.shape, 1, bits, 32, pad,
                   x.dtype)
    ref = compress(x, bits, 32)
    assert torch.equal(c.data, ref.data) and torch.equal(decompress(c), decompress(ref))


def test_kv_slot_bytes():
    from flexrun.memory.quant import kv_slot_nbytes
    # 2 rows x 3 KV heads, 100 positions, head dim 64, fp16: codes 32 B per position and
    # part; per_token: one min + scale per position and part; kivi: keys one per channel per
    # 64 positions (2 groups); the exact ring (window + key group - 1) and sinks in fp16
    rows_heads = 2 * 3
    codes = 2 * 100 * 32
    assert kv_slot_nbytes(2, 100, 3, 64, 2, 4, 64, "per_token", 0) == rows_heads * (
        codes + 2 * 2 * (100 + 100))
    assert kv_slot_nbytes(2, 100, 3, 64, 2, 4, 64, "kivi", 32, 4) == rows_heads * (
        codes + 2 * 2 * (2 * 64 + 100) + 2 * (32 + 63 + 4) * 64 * 2)
