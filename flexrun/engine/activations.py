"""Activations and small tensors between the GPU and host memory: a unit's output kept or
offloaded per the activation policy (pinned host buffers or disk), copied back ahead of use,
and the q/k/v / attention-output round trips of CPU attention. A mixin of engine.Pipeline,
which owns the streams, the tiers and the reused pinned buffers it uses."""
from __future__ import annotations

import torch

from flexrun.memory.pinned import pinned_empty


class HostTransfers:
    """Pipeline's host-memory traffic besides weights and the KV cache."""

    def _put_act(self, u: int, h: torch.Tensor, batch_no: int = 0):
        """Keep or offload a unit's output per the activation policy (async to pinned host)."""
        tier = self.act_tiers[u]
        if tier == "gpu" or (tier == "cpu" and not self.cuda):
            return h
        if tier == "cpu":
            # unit u's output is read by unit u+1 before unit u+2 (same parity) overwrites
            # it, and both copies are ordered on the streams: two homes per batch suffice
            host = self._host_buffer(f"act{u % 2}", batch_no, h)
            if not self.policy.overlap:
                return host.copy_(h)
            self.store_stream.wait_stream(self.compute_stream)
            with torch.cuda.stream(self.store_stream):
                host.copy_(h, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.store_stream)
            self.kv.hold.add(ev, (h,))      # h held until copied (not record_stream: kvcache)
            return (host, ev)
        path = self.disk.new_path(f"act-u{u}")
        self.disk.write(path, h)
        return (path, tuple(h.shape), h.dtype)

    def _prefetch_acts(self, batches: list, u: int) -> None:
        """Copy unit u's inputs that wait in pinned host memory to the GPU now, on the weight
        stream ahead of the next unit's weights: issued later from the compute stream, each
        copy queued behind that unit's weight copy (~0.7 s per step at OPT-30B, 32x2)."""
        if not (self.cuda and self.policy.overlap and u >= 1):     # unit 0 embeds ids
            return
        for b in batches:
            if b.finished or not (isinstance(b.hidden, tuple) and len(b.hidden) == 2):
                continue
            host, ev = b.hidden
            if host.is_cuda:
                continue
            # the device copy comes from the compute stream's pool, in its order (as
            # TieredStore.fetch_ordered does for weights): no pool of the weight stream's
            with torch.cuda.stream(self.compute_stream):
                dev = torch.empty(host.shape, dtype=host.dtype, device=self.device)
            free = torch.cuda.Event()
            free.record(self.compute_stream)
            with torch.cuda.stream(self.weight_stream):
                self.weight_stream.wait_event(ev)
                self.weight_stream.wait_event(free)
                dev.copy_(host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.weight_stream)
            b.hidden = (dev, ready)

    def _get_act(self, value) -> torch.Tensor:
        if isinstance(value, tuple) and len(value) == 2:
            host, ev = value
            self.compute_stream.wait_event(ev)
            value = host
        elif isinstance(value, tuple):
            path, shape, dtype = value
            out = self.disk.read_into(path, torch.empty(shape, dtype=dtype))
            path.unlink()
            value = out
        return value.to(self.device, non_blocking=True)

    def _attn_to_device(self, host: torch.Tensor, aside: bool) -> torch.Tensor:
        """A CPU attention output back on the GPU. aside (decode of a MoE layer, every batch's
        attention first): on the attention-output stream, so that the next batch's q/k/v
        projection does not wait behind this copy, which itself waits behind any expert
        copies queued before it on the copy engine; the compute stream waits for the
        attention-output stream before the layer's MoE (Pipeline._attend_first)."""
        if not aside:
            return host.to(self.device, non_blocking=True)
        dev = torch.empty(host.shape, dtype=host.dtype, device=self.device)  # compute stream's
        self.attn_out_stream.wait_stream(self.compute_stream)
        with torch.cuda.stream(self.attn_out_stream):
            dev.copy_(host, non_blocking=True)
        return dev

    def _host_buffer(self, name: str, batch_no: int, like: torch.Tensor) -> torch.Tensor:
        """A pinned host buffer shaped like `like`, reused per (name, GPU batch): fresh pinned
        tensors per call cost a pinned-allocator round trip each (~2.5 ms on the H100 host).
        q/k/v and attention-output buffers are written by the host only after `_to_host` has
        synchronized the compute stream, which holds their previous copies (or waited for
        the attention-output stream that holds them before the MoE); activation
        buffers are ordered by the streams (see _put_act)."""
        key = (name, batch_no)
        buf = self._host_bufs.get(key)
        n = like.numel()
        if buf is None or buf.numel() < n or buf.dtype != like.dtype:
            if buf is not None:
                torch.cuda.synchronize(self.device)
            buf = pinned_empty((n,), like.dtype)
            self._host_bufs[key] = buf
        return buf[:n].view(like.shape)

    def _to_host(self, batch_no: int, **xs: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Small GPU tensors to host memory: async copies into pinned buffers, one wait (a
        None passes as it is)."""
        if not self.cuda:
            return list(xs.values())
        out = [x if x is None else self._host_buffer(n, batch_no, x).copy_(x, non_blocking=True)
               for n, x in xs.items()]
        torch.cuda.current_stream(self.device).synchronize()
        return out
