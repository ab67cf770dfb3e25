"""Host-tier weights of a GPU run share a few registered chunks (memory.pinned.PinnedArena)."""
import torch

from flexrun.memory.pinned import PinnedArena


def test_small_tensors_share_growing_aligned_chunks_and_large_ones_get_their_own():
    calls = []

    def empty(shape, dtype):        # stands in for a registration (pinned_empty)
        calls.append((tuple(shape), dtype))
        return torch.empty(shape, dtype=dtype)
    arena = PinnedArena(chunk=16384, empty=empty)
    g = torch.Generator().manual_seed(0)
    small = [torch.randn(n, generator=g).to(dt) for n, dt in
             ((10, torch.float32), (33, torch.float16), (7, torch.bfloat16), (60, torch.float32))]
    copies = [arena.copy(t) for t in small]
    assert calls == [((1024,), torch.uint8)]            # one chunk (16384 / 16) for all four
    base = arena.chunks[0].data_ptr()
    assert [c.data_ptr() - base for c in copies] == [0, 256, 512, 768]   # 256-byte aligned
    for c, t in zip(copies, small):
        assert c.dtype == t.dtype and torch.equal(c, t)
    big = arena.copy(torch.ones(64, 4))                 # 1 KiB >= 16384 / 16: its own buffer
    assert calls[-1] == ((64, 4), torch.float32) and torch.equal(big, torch.ones(64, 4))
    pieces = [arena.copy(torch.full((250,), float(i))) for i in range(40)]   # 1000 B each
    sizes = [shape[0] for shape, dt in calls if dt == torch.uint8]
    assert sizes == [1024, 2048, 4096, 8192, 16384, 16384]     # doubling up to the chunk
    for p, value in zip(pieces, range(40)):
        chunk = next(c for c in arena.chunks
                     if c.data_ptr() <= p.data_ptr() < c.data_ptr() + c.numel())
        assert p.data_ptr() + p.nbytes <= chunk.data_ptr() + chunk.numel()
        assert (p.data_ptr() - chunk.data_ptr()) % 256 == 0 and float(p[0]) == value
    assert torch.equal(copies[0], small[0])             # earlier pieces untouched
    assert arena.empty((0, 5), torch.float16).shape == (0, 5)
