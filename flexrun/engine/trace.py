"""A per-step timeline in Chrome trace format: loads, stores and compute as events per track."""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch


class Tracer:
    """Records spans; CUDA work is timed with events on its stream, host work with a clock."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.host_events: list[tuple[str, str, float, float]] = []
        self.cuda_events: list[tuple[str, str, object, object]] = []
        self._lock = threading.Lock()
        self.t0 = time.perf_counter()
        if enabled and self.cuda:
            self.base = torch.cuda.Event(enable_timing=True)
            self.base.record()
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

    @contextmanager
    def span(self, name: str, track: str, stream=None):
        if not self.enabled:
            yield
            return
        if self.cuda and stream is not None:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(stream)
            yield
            b.record(stream)
            with self._lock:
                self.cuda_events.append((name, track, a, b))
            return
        start = time.perf_counter()
        yield
        with self._lock:
            self.host_events.append((name, track, start - self.t0, time.perf_counter() - self.t0))

    def save(self, path: str | Path) -> None:
        if not self.enabled:
            return
        rows = [(n, tr, s * 1e6, e * 1e6) for n, tr, s, e in self.host_events]
        if self.cuda_events:
            torch.cuda.synchronize()
            for n, tr, a, b in self.cuda_events:
                s = self.base.elapsed_time(a) * 1e3
                rows.append((n, tr, s, s + a.elapsed_time(b) * 1e3))
        tracks = sorted({r[1] for r in rows})
        tid = {t: i for i, t in enumerate(tracks)}
        events = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": tid[t],
                   "args": {"name": t}} for t in tracks]
        events += [{"name": n, "ph": "X", "pid": 0, "tid": tid[tr], "ts": round(s, 1),
                    "dur": round(max(e - s, 0.0), 1)} for n, tr, s, e in rows]
        Path(path).write_text(json.dumps({"traceEvents": events}))
