"""KV cache homes: one slot per (layer, GPU batch), time-major (T, batch, kv_heads, head_dim).

A slot lives on the compute device ("gpu"), in host memory ("cpu", pinned for a CUDA run)
or on disk (one file, written and read at byte offsets: time-major keeps every prefix and
every appended step contiguous).
"""
from __future__ import annotations

import os

import torch

from ..storage import DiskTier


class KVSlot:
    def __init__(self, tier: str, shape: tuple[int, int, int, int], dtype: torch.dtype,
                 device: torch.device, disk: DiskTier | None, name: str):
        self.tier, self.shape, self.dtype, self.device = tier, shape, dtype, device
        self.row_bytes = shape[1] * shape[2] * shape[3] * torch.tensor([], dtype=dtype).element_size()
        if tier == "gpu":
            self.kv = [torch.empty(shape, dtype=dtype, device=device) for _ in range(2)]
        elif tier == "cpu":
            pin = device.type == "cuda"
            self.kv = [torch.empty(shape, dtype=dtype, pin_memory=pin) for _ in range(2)]
        else:
            self.disk = disk
            self.paths = [disk.new_path(f"{name}.{x}") for x in "kv"]
            self.fds = [os.open(p, os.O_RDWR | os.O_CREAT, 0o600) for p in self.paths]

    @property
    def on_host(self) -> bool:
        return self.tier != "gpu" or self.device.type == "cpu"

    def write(self, k: torch.Tensor, v: torch.Tensor, t0: int) -> None:
        """Store k, v (s, b, kv_heads, hd) at time positions t0..t0+s."""
        if self.tier != "disk":
            for buf, x in zip(self.kv, (k, v)):
                buf[t0:t0 + x.shape[0]].copy_(x)
            return
        for fd, x in zip(self.fds, (k, v)):
            data = x.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).numpy()
            os.pwrite(fd, data.reshape(-1), t0 * self.row_bytes)

    def read(self, t_end: int, device: torch.device, pinned: bool = False):
        """(K, V) for positions [0, t_end) on `device` (views when already there)."""
        if self.tier != "disk":
            out = [buf[:t_end] for buf in self.kv]
            if out[0].device != device:
                out = [x.to(device, non_blocking=True) for x in out]
            return out
        out = []
        for fd in self.fds:
            t = torch.empty((t_end,) + self.shape[1:], dtype=self.dtype, pin_memory=pinned)
            mv = memoryview(t.view(torch.uint8).numpy().reshape(-1))
            pos = 0
            while pos < len(mv):
                pos += os.preadv(fd, [mv[pos:]], pos)
            out.append(t.to(device, non_blocking=True) if device.type != "cpu" else t)
        return out

    def close(self) -> None:
        if self.tier == "disk":
            for fd in self.fds:
                os.close(fd)
            for p in self.paths:
                p.unlink(missing_ok=True)
            self.fds = []


class KVCache:
    """All slots of a block; layer j's slots live on the tier given by `layer_tiers[j]`."""

    def __init__(self, layer_tiers: list[str], device: torch.device, dtype: torch.dtype,
                 disk: DiskTier | None, num_kv_heads: int, head_dim: int):
        self.layer_tiers, self.device, self.dtype = layer_tiers, device, dtype
        self.disk, self.kv_heads, self.head_dim = disk, num_kv_heads, head_dim
        self.slots: dict[tuple[int, int], KVSlot] = {}

    def slot(self, layer: int, batch: int, max_len: int, rows: int) -> KVSlot:
        """The slot for (layer, batch), (re)allocated when too small for this block."""
        s = self.slots.get((layer, batch))
        shape = (max_len, rows, self.kv_heads, self.head_dim)
        if s is None or s.shape[0] < max_len or s.shape[1] != rows:
            if s is not None:
                s.close()
            s = self.slots[(layer, batch)] = KVSlot(
                self.layer_tiers[layer], shape, self.dtype, self.device, self.disk,
                f"kv-l{layer}-b{batch}")
        return s

    def bytes_per_tier(self) -> dict[str, int]:
        out = {"gpu": 0, "cpu": 0, "disk": 0}
        for s in self.slots.values():
            n = s.shape[0] * s.row_bytes * 2
            out[s.tier] += n
        return out

    def close(self) -> None:
        for s in self.slots.values():
            s.close()
        self.slots.clear()
