"""The Triton grouped GEMM (kernels/grouped.py) against per-group matmuls: empty groups,
groups longer than a row block, widths not a multiple of the tiles, a depth past the deep
tiles' threshold (fixed_tiles); and its block layout.

Runs on CUDA, or on the CPU through Triton's interpreter (TRITON_INTERPRET=1 in a child
process); skipped where Triton is not installed."""
import pytest
import torch

from conftest import run_triton_check

CHECK = r"""
import torch
from flexrun.kernels import grouped
dev = "cuda" if torch.cuda.is_available() else "cpu"
grouped.shared_memory = lambda device: 1 << 20     # the deep tiles wherever K calls for them
g = torch.Generator().manual_seed(0)
# Triton's CPU interpreter mishandles bf16 loads: bf16 is checked on CUDA only
for dt in (torch.float16,) + ((torch.bfloat16,) if dev == "cuda" else ()):
    assert not grouped.applies(torch.ones(2, 2, device=dev), torch.ones(1, 2, 2, device=dev))
    for counts, N, K in [([3, 0, 5, 17, 1], 40, 24), ([0, 0, 70], 64, 96), ([2] * 8, 130, 64),
                         ([0, 1], 16, 16), ([40] * 3, 48, 200), ([3, 0, 2], 24, 4160)]:
        E, M = len(counts), sum(counts)
        x = torch.randn(M, K, generator=g).to(dt).to(dev)
        w = torch.randn(E, N, K, generator=g).to(dt).to(dev)
        ends = torch.tensor(counts).cumsum(0).to(torch.int32).to(dev)
        assert grouped.applies(x, w)
        y = grouped.grouped_mm(x, w, ends)
        ref, s = [], 0
        for e, c in enumerate(counts):
            ref.append(x[s:s + c].float() @ w[e].float().T)
            s += c
        ref = torch.cat(ref)
        tol = (2e-2 if dt == torch.float16 else 6e-2) * max(1.0, ref.abs().max().item())
        assert (y.float() - ref).abs().max().item() <= tol, (dt, counts)
        if counts[0] and counts[2]:         # another expert's weights are caught
            bad = grouped.grouped_mm(x, w.flip(0).contiguous(), ends)
            assert (bad.float() - ref).abs().max().item() > 0.1
print("ok")
"""


def test_grouped_gemm_matches_per_group_matmuls():
    pytest.importorskip("triton")
    run_triton_check(CHECK)


def test_block_layout_covers_each_group_once():
    from flexrun.kernels.grouped import block_layout
    counts = [3, 0, 17, 16, 1]
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    group, row = block_layout(ends, sum(counts), 16)
    E = len(counts)
    assert group.numel() == -(-sum(counts) // 16) + E
    used = [(int(g), int(r)) for g, r in zip(group, row) if g < E]
    # expert 0: 1 block, 2: 2 blocks (rows 3, 19), 3: 1 (20), 4: 1 (36)
    assert used == [(0, 0), (2, 3), (2, 19), (3, 20), (4, 36)]
    assert all(int(g) == E for g in group[len(used):])


def test_deep_tiles_only_for_deep_decode_calls_that_fit():
    from flexrun.kernels.grouped import fixed_tiles
    assert fixed_tiles(4096, 16, 2, 1 << 20) == (64, 128, 4)
    assert fixed_tiles(4096, 16, 2, None) == (64, 64, 3)        # shared memory unknown
    assert fixed_tiles(4096, 16, 2, 64 << 10) == (64, 64, 3)    # 80 KB of stages: no room
    assert fixed_tiles(4096, 32, 2, 1 << 20) == (64, 64, 3)     # not a decode row block
    assert fixed_tiles(2048, 16, 2, 1 << 20) == (64, 64, 3)


def test_a_calls_second_gemm_reuses_the_block_layout():
    """The two grouped GEMMs of a MoE call pass the same ends: the second reuses the first's
    layout; ends changed in place, other rows or another tensor get their own."""
    from flexrun.kernels.grouped import block_layout
    ends = torch.tensor([3, 3, 20, 41], dtype=torch.int32)
    first = block_layout(ends, 41, 16)
    assert block_layout(ends, 41, 16) is first
    assert block_layout(ends.clone(), 41, 16) is not first
    again = block_layout(ends, 41, 16)
    ends[1] = 10                                    # in place: its version moves
    moved = block_layout(ends, 41, 16)
    assert moved is not again and not torch.equal(moved[1], again[1])
    assert block_layout(ends, 40, 16) is not moved
