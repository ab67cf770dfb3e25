"""Per-step inputs of a batch's units: attention masks, key ranges and positions, each made
once per decode step and reused by every layer. A mixin of engine.Pipeline (its device)."""
from __future__ import annotations

import torch

from flexrun.engine.attention import decode_mask, prefill_mask


class StepInputs:
    """Pipeline's masks, key ranges and positions of a BatchState `b`."""

    def _mask(self, b, where: torch.device, prefill: bool,
              window: int | None = None):
        """The step's attention mask on `where`, built once per step (None: no padding and
        no window, or a window the keys do not reach past)."""
        keys = b.prompt_len if prefill else b.time + 1
        if window is not None and window >= keys:
            window = None
        def make():
            if not b.padded and window is None:
                return None
            m = prefill_mask(b.prefill_valid(), window) if prefill else \
                decode_mask(b.valid[:, :b.time + 1], window)
            return m.to(where)
        return self._per_step(b, (b.time, prefill, where.type, window), make)

    def _key_range(self, b) -> tuple[torch.Tensor, torch.Tensor]:
        """(start (b,), last (1,)) on the device: each row's keys in this decode step are
        [start, last] (its prompt after the left padding, then every token since), for the
        split-K kernel, which reads only those keys of the whole slot."""
        def make():
            return (b.key_start().to(self.device),
                    torch.full((1,), b.time, dtype=torch.long, device=self.device))
        return self._per_step(b, (b.time, "range"), make)

    @staticmethod
    def _per_step(b, key: tuple, make):
        """b's value for `key`, made once per step (values of earlier steps are dropped)."""
        if key not in b.masks:
            if len(b.masks) > 7:
                b.masks.clear()
            b.masks[key] = make()
        return b.masks[key]

    def _positions(self, b, prefill: bool) -> torch.Tensor:
        if prefill:
            v = b.prefill_valid().long()
            return (v.cumsum(-1) - 1).clamp(min=0)
        return b.next_pos[:, None]
