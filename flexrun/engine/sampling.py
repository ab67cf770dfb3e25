"""Next-token choice per row: greedy or temperature / top-k / top-p sampling, each row with
its own request's settings, stop conditions (stop ids, stop strings, a token cap) and, where
asked, the log-probabilities of what it picked.

A row is one sample of one request. A row whose request has a seed draws from a generator
seeded from (seed, sample index) only, so its samples do not depend on how rows are grouped
into batches and blocks; other rows from (a fresh seed, row index).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from flexrun.config import SamplingParams

STOP_MARGIN = 16     # ids decoded beyond a stop string's length (stop_string_hit)


@dataclass
class Row:
    """What the sampler knows of one row."""
    params: SamplingParams
    sample: int = 0                 # which of its request's n samples
    limit: int | None = None        # its cap on new tokens
    forced: list[int] | None = None  # teacher forcing: its next tokens are given (scoring)


@dataclass
class Picked:
    """Log-probabilities of a step's picks: (b,) each row's token, (b, k) the top k."""
    logprob: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


class Sampler:
    def __init__(self, params: SamplingParams | dict[int, Row], eos_ids: list[int],
                 decode: Callable[[list[int]], str] | None = None):
        """params: one SamplingParams for every row, or a Row per row index. decode turns
        ids into text (stop strings need it)."""
        self.rows = params if isinstance(params, dict) else None
        self.params = params if isinstance(params, SamplingParams) else None
        self.eos_ids = list(eos_ids)
        self.decode = decode
        self._gens: dict[int, torch.Generator] = {}
        self._fresh: int | None = None      # drawn when an unseeded row first samples
        every = [self.params] if self.rows is None else [r.params for r in self.rows.values()]
        self.all_greedy = all(p.greedy for p in every)
        self.top_k_max = max((p.top_logprobs for p in every if p.logprobs), default=-1)
        self._stop_sets: dict[int, set[int]] = {}
        # forced rows: step counts; their picks' log-probabilities are always computed
        self.forced = {i: r.forced for i, r in (self.rows or {}).items() if r.forced}
        self._steps: dict[int, int] = {}
        if self.forced:
            self.top_k_max = max(self.top_k_max, 0)

    def config(self) -> SamplingParams | dict[int, Row]:
        """What rebuilds this sampler elsewhere (a pipeline stage's process)."""
        return self.rows if self.rows is not None else self.params

    @property
    def wants_logprobs(self) -> bool:
        return self.top_k_max >= 0

    def row(self, i: int) -> Row:
        return self.rows[i] if self.rows is not None else Row(self.params)

    def stops(self, i: int) -> set[int]:
        """Row i's stop ids (EOS included unless its request ignores EOS)."""
        s = self._stop_sets.get(i)
        if s is None:
            p = self.row(i).params
            s = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_ids))
            self._stop_sets[i] = s
        return s

    def limit(self, i: int) -> int | None:
        return self.row(i).limit

    def _generator(self, i: int) -> torch.Generator:
        g = self._gens.get(i)
        if g is None:
            r = self.row(i)
            if r.params.seed is None and self._fresh is None:
                self._fresh = torch.seed()      # reseeds torch's default generator: only then
            seed, k = (r.params.seed, r.sample) if r.params.seed is not None else (self._fresh, i)
            g = self._gens[i] = torch.Generator().manual_seed(
                (int(seed) * 1_000_003 + k) % (2**63))
        return g

    def release(self, i: int) -> None:
        self._gens.pop(i, None)
        self._stop_sets.pop(i, None)
        self._steps.pop(i, None)

    def __call__(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """logits: (b, vocab) on any device -> (b,) token ids: greedy ones on the logits'
        device (the host reads them a step later: Pipeline._defer), sampled ones on CPU; a
        forced row's given token instead of either."""
        if self.all_greedy:
            out = logits.argmax(dim=-1)
        else:
            host = logits.float().cpu()
            out = host.argmax(dim=-1)
            for n, i in enumerate(rows):
                p = self.row(i).params
                if not p.greedy and i not in self.forced:
                    out[n] = self._sample(host[n], p, self._generator(i))
        return self._force(out, rows) if self.forced else out

    def _force(self, out: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """out with each forced row's next given token (its last once they run out: the row
        has stopped by then)."""
        at, given = [], []
        for n, i in enumerate(rows):
            f = self.forced.get(i)
            if f is not None:
                k = self._steps.get(i, 0)
                self._steps[i] = k + 1
                at.append(n)
                given.append(f[min(k, len(f) - 1)])
        if at:
            out = out.clone()
            out[torch.tensor(at, device=out.device)] = torch.tensor(given, dtype=out.dtype,
                                                                   device=out.device)
        return out

    @staticmethod
    def _sample(logits: torch.Tensor, p: SamplingParams, g: torch.Generator) -> torch.Tensor:
        logits = logits / p.temperature
        if p.top_k > 0:
            k = min(p.top_k, logits.shape[-1])
            kth = torch.topk(logits, k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_l, idx = torch.sort(logits, descending=True)
            probs = sorted_l.softmax(-1)
            drop = probs.cumsum(-1) - probs >= p.top_p   # keep the smallest set reaching top_p
            sorted_l = sorted_l.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_l)
        return torch.multinomial(logits.softmax(-1), 1, generator=g)[0]

    def logprobs(self, logits: torch.Tensor, tok: torch.Tensor) -> Picked:
        """The picks' log-softmax of the model's logits and the top k (k = the largest
        top_logprobs asked in the block), on the host."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        chosen = lp.gather(-1, tok.to(lp.device).view(-1, 1))[:, 0]
        top = lp.topk(self.top_k_max, dim=-1) if self.top_k_max > 0 else None
        return Picked(chosen.cpu(), top.indices.cpu() if top is not None else None,
                      top.values.cpu() if top is not None else None)

    def stop_string_hit(self, i: int, out: list[int]) -> int | None:
        """How many of row i's ids to keep when its text now holds a stop string (the ids up
        to the one that completed the match, the text later cut before it); None: no match."""
        stops = self.row(i).params.stop
        if not stops or self.decode is None:
            return None
        longest = max(len(s) for s in stops)
        # only a match that the newest token completed is new, and it lies in the text of the
        # last ids (a token gives at least one character but for rare partial ones: a
        # margin), so only those are decoded: linear in the output, not quadratic
        last = out[-(longest + STOP_MARGIN):]
        text = self.decode(last)
        tail_from = max(0, len(self.decode(last[:-1])) - longest + 1) if len(last) > 1 else 0
        if any(s in text[tail_from:] for s in stops):
            return len(out)
        return None


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """text before the first stop string it holds, and whether one was found."""
    at = [text.find(s) for s in stops if s in text]
    return (text[:min(at)], True) if at else (text, False)
