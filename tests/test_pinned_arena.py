"""Host-tier weights of a GPU run share a few registered chunks (memory.pinned.PinnedArena)."""
import torch

from flexrun.memory.pinned import PinnedArena


def test_small_tensors_share_aligned_chunks_and_large_ones_get_their_own():
    calls = []

    def empty(shape, dtype):        # stands in for a registration (pinned_empty)
        calls.append((tuple(shape), dtype))
        return torch.empty(shape, dtype=dtype)
    arena = PinnedArena(chunk=16384, empty=empty)
    g = torch.Generator().manual_seed(0)
    small = [torch.randn(n, generator=g).to(dt) for n, dt in
             ((10, torch.float32), (33, torch.float16), (7, torch.bfloat16), (100, torch.float32))]
    copies = [arena.copy(t) for t in small]
    assert calls == [((16384,), torch.uint8)]           # one chunk for all four
    base = arena.chunks[0].data_ptr()
    offsets = [c.data_ptr() - base for c in copies]
    assert offsets == [0, 256, 512, 768]                # 256-byte aligned in the chunk
    for c, t in zip(copies, small):
        assert c.dtype == t.dtype and torch.equal(c, t)
    big = arena.copy(torch.ones(64, 4))                 # 1 KiB >= 16384 / 16: its own buffer
    assert calls[-1] == ((64, 4), torch.float32) and torch.equal(big, torch.ones(64, 4))
    nxt = arena.copy(torch.zeros(50, 4))                # 800 B after the 1168 used, aligned
    assert nxt.data_ptr() - base == 1280
    pieces = [nxt]
    while len(arena.chunks) == 1:
        pieces.append(arena.copy(torch.full((250,), float(len(pieces)))))   # 1000 B each
    assert pieces[-1].data_ptr() == arena.chunks[1].data_ptr()
    assert all(base <= p.data_ptr() and p.data_ptr() + p.nbytes <= base + 16384
               for p in pieces[:-1])
    assert [float(p[0]) for p in pieces[1:]] == list(range(1, len(pieces)))
    assert torch.equal(copies[0], small[0])             # earlier pieces untouched
    assert arena.empty((0, 5), torch.float16).shape == (0, 5)
