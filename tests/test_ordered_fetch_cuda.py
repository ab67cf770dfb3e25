"""Weights fetched into the compute stream's pool (TieredStore.reserve_ordered on the thread
that enqueues compute, copy_ordered on an I/O thread after its disk reads): the values land
whole, and blocks the compute stream freed are reused only after its kernels that read them.
CUDA only (skipped elsewhere)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from flexrun.memory.disk import DiskTier
from flexrun.memory.quant import compress
from flexrun.memory.storage import TieredStore, parts

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_io_thread_copies_into_reserved_buffers(tmp_path):
    dev = torch.device("cuda")
    disk = DiskTier(tmp_path)
    st = TieredStore(dev, disk, pin=True)
    g = torch.Generator().manual_seed(0)
    want = {"a": torch.randn(4096, 1024, generator=g).half(),
            "b": torch.randn(2048, 512, generator=g).half(),
            "c": compress(torch.randn(1024, 512, generator=g).half(), 4, 64)}
    for (n, v), tier in zip(want.items(), ("disk", "cpu", "disk")):
        st.put(n, v, tier)
    compute, copy = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
    io = ThreadPoolExecutor(1)
    try:
        for _ in range(3):
            with torch.cuda.stream(compute):    # a long kernel chain reading a block that
                x = torch.randn(4096, 4096, device=dev, dtype=torch.half)  # is then freed
                for _ in range(20):
                    x = torch.tanh(x @ x.T / 64)     # bounded: stays finite
                s = x.float().sum()
                del x
            out, ready = st.reserve_ordered(list(want), compute)

            def load():
                host = {n: st.read_host(n, pinned=True) for n in want}
                return st.copy_ordered(out, ready, host, copy)
            got = io.submit(load).result()
            done = torch.cuda.Event()
            done.record(copy)
            compute.wait_event(done)
            with torch.cuda.stream(compute):    # what the compute stream reads, in its order
                seen = {n: [p.clone() for p in parts(got[n])] for n in want}
            torch.cuda.synchronize()
            assert torch.isfinite(s)
            for n, v in want.items():
                assert all(torch.equal(p.cpu(), q) for p, q in zip(seen[n], parts(v)))
    finally:
        io.shutdown()
        disk.close()
