"""What a run measured: prefill and decode seconds, tokens, peak memory; one block at a time."""
from __future__ import annotations

from dataclasses import dataclass, field

from flexrun.engine.requests import prefill_rows


@dataclass
class RunStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_rows: int = 0               # prompts the prefills computed (n samples share one)
    peak_gpu_bytes: int = 0
    peak_rss_bytes: int = 0
    weight_quant_s: float = 0.0         # 4-bit weight search at load (or its cache read)
    weight_quant_cached: bool = False   # read from the user's cache (memory/wquant.py)
    weights_split: dict = field(default_factory=dict)

    def add_block(self, batches: list, t0: float, first: float, t1: float, peak_gpu: int,
                  peak_rss: int) -> None:
        """A block that started at t0, ended its prefill at `first` and finished at t1."""
        self.prefill_s += first - t0
        self.decode_s += t1 - first
        self.prompt_tokens += sum(b.ids.numel() for b in batches)
        self.prefill_rows += sum(prefill_rows(b) for b in batches)
        self.generated_tokens += sum(len(o) for b in batches for o in b.outputs)
        self.peak_gpu_bytes = max(self.peak_gpu_bytes, peak_gpu)
        self.peak_rss_bytes = max(self.peak_rss_bytes, peak_rss)
