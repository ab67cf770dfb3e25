"""One GPU batch of a block: its prompts, masks and what it has generated so far."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class BatchState:
    """One GPU batch of the block: left-padded prompts and what has been generated."""
    indices: list[int]                  # global prompt indices
    ids: torch.Tensor                   # (b, P) prompt ids, left padded
    valid: torch.Tensor                 # (b, P + gen) bool: real tokens
    prompt_len: int
    next_pos: torch.Tensor              # (b,) position of the next token
    last: torch.Tensor | None = None    # (b, 1) last sampled token
    hidden: object = None               # activation between units
    outputs: list[list[int]] = field(default_factory=list)
    done: list[bool] = field(default_factory=list)
    batch_no: int = 0                   # index within the block (selects KV slots)
    time: int = 0                       # cache index of the token fed in a decode step
    padded: bool = True                 # some row is left padded (masks needed)
    masks: dict = field(default_factory=dict)   # attention masks of the current step
    pending: tuple | None = None        # a CUDA step's ids on their way to the host (_defer)
    keep_logits: bool = False           # keep every prompt position's logits (scoring)
    logits: torch.Tensor | None = None
    finish: list = field(default_factory=list)      # per row: None, "stop" or "length"
    logprobs: list | None = None        # per row: [(logprob, top ids, top logprobs)] per token
    fork: torch.Tensor | None = None    # (rows,) the prefill row each row copies (n samples)
    pre: torch.Tensor | None = None     # (prefill rows,) a row of each distinct prompt
    prompt_lp_k: int | None = None      # prompt log-probabilities with the top k, if asked
    prompt_lp: tuple | None = None      # (b, P-1) logprobs, (b, P-1, k) top ids, top logprobs

    def __post_init__(self) -> None:
        rows = len(self.indices)
        self.finish = self.finish or [None] * rows
        if self.logprobs is None:
            self.logprobs = [[] for _ in range(rows)]

    @property
    def finished(self) -> bool:
        return all(self.done)

    def prefill_valid(self) -> torch.Tensor:
        """valid of the prompt positions of the rows the prefill computes."""
        v = self.valid[:, :self.prompt_len]
        return v if self.pre is None else v[self.pre]

    def key_start(self) -> torch.Tensor:
        """(b,) each row's first key: its prompt begins after the left padding, and every
        token sampled since is a key too (valid marks them, done rows included)."""
        P = self.prompt_len
        return P - self.valid[:, :P].sum(1)
