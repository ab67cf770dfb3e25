"""Next-token choice: greedy or temperature / top-k / top-p sampling with per-prompt seeds.

Each prompt gets its own torch.Generator seeded from (seed, prompt index), so sampled
outputs do not depend on how prompts are grouped into batches and blocks.
"""
from __future__ import annotations

import torch

from flexrun.config import SamplingParams


class Sampler:
    def __init__(self, params: SamplingParams, eos_ids: list[int]):
        self.params = params
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops |= set(eos_ids)
        self.stop_ids = stops
        self._gens: dict[int, torch.Generator] = {}

    def _generator(self, prompt_index: int) -> torch.Generator:
        g = self._gens.get(prompt_index)
        if g is None:
            seed = self.params.seed if self.params.seed is not None else torch.seed()
            g = self._gens[prompt_index] = torch.Generator().manual_seed(
                (int(seed) * 1_000_003 + prompt_index) % (2**63))
        return g

    def release(self, prompt_index: int) -> None:
        self._gens.pop(prompt_index, None)

    def __call__(self, logits: torch.Tensor, prompt_indices: list[int]) -> torch.Tensor:
        """logits: (b, vocab) on any device -> (b,) token ids: greedy ones on the logits'
        device (the host reads them a step later: Pipeline._defer), sampled ones on CPU."""
        p = self.params
        if p.greedy:
            return logits.argmax(dim=-1)
        logits = logits.float().cpu() / p.temperature
        if p.top_k > 0:
            k = min(p.top_k, logits.shape[-1])
            kth = torch.topk(logits, k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_l, idx = torch.sort(logits, dim=-1, descending=True)
            cum = sorted_l.softmax(-1).cumsum(-1)
            drop = cum - sorted_l.softmax(-1) >= p.top_p   # keep the smallest set reaching top_p
            sorted_l = sorted_l.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_l)
        probs = logits.softmax(-1)
        out = [torch.multinomial(probs[i], 1, generator=self._generator(j))
               for i, j in enumerate(prompt_indices)]
        return torch.cat(out)
