"""`flexrun eval-ppl`: perplexity of a text file with a sliding window, scored from prefill
logits and, with --decode, through teacher-forced decode steps that read the KV cache."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from flexrun.api import LLM
from flexrun.cli.common import open_llm
from flexrun.config import FlexrunError


def eval_ppl(args) -> int:
    """Perplexity over a text with a sliding window (each token scored once)."""
    path = Path(args.text)
    if not path.is_file():
        raise FlexrunError(f"text file {path} not found")
    if args.stride < 1 or args.window < 2 or args.stride > args.window:
        raise FlexrunError("need window >= 2 and 1 <= stride <= window")
    decode = getattr(args, "decode", False)
    prefill = getattr(args, "prefill", 32)
    if decode and not 1 <= prefill < args.window:
        raise FlexrunError("need 1 <= --prefill < --window")
    # what --policy auto plans for: windows of `window` tokens (scored by prefill, or fed on
    # from `prefill` one decode step at a time)
    workload = (args.window, args.window - prefill if decode else 1, None)
    with open_llm(args, workload=workload) as llm:
        if llm.tokenizer is None:
            raise FlexrunError(f"{args.model} has no tokenizer: eval-ppl needs text input")
        ids = llm.tokenizer.encode(path.read_text(encoding="utf-8")).ids
        nll, count = perplexity_terms(llm, ids, args.window, args.stride)
        out = {"model": args.model, "text": str(path), "tokens": count, "window": args.window,
               "stride": args.stride, "ppl": math.exp(nll / max(count, 1))}
        if decode:
            dnll, dcount = decode_terms(llm, ids, args.window, args.stride, prefill)
            out.update(prefill=prefill, decode_tokens=dcount,
                       decode_ppl=math.exp(dnll / max(dcount, 1)))
    print(json.dumps(out))
    return 0


def windows(ids: list[int], window: int, stride: int) -> list[tuple[list[int], int]]:
    """HF-style sliding windows: (window's ids, how many of its last tokens it scores); every
    token but the first is scored once, in the first window that ends after it."""
    out, prev_end = [], 0
    for begin in range(0, max(len(ids) - 1, 1), stride):
        end = min(begin + window, len(ids))
        w = ids[begin:end]
        out.append((w, min(end - prev_end, len(w) - 1)))     # its first token has no context
        prev_end = end
        if end == len(ids):
            break
    return out


def perplexity_terms(llm: LLM, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Sum of token NLLs and the number of scored tokens, from prefill logits."""
    wins = windows(ids, window, stride)
    nll, count = 0.0, 0
    for (w, n), logits in zip(wins, llm.prompt_logits([w for w, _ in wins])):
        lp = torch.log_softmax(logits[:-1].double(), -1)
        tgt = torch.tensor(w[1:])
        tok_nll = -lp.gather(-1, tgt[:, None])[:, 0]
        nll += float(tok_nll[-n:].sum()) if n else 0.0
        count += n
    return nll, count


def decode_terms(llm: LLM, ids: list[int], window: int, stride: int,
                 prefill: int = 32) -> tuple[float, int]:
    """The same windows scored through decode steps (LLM.score_decode): each window's first
    `prefill` tokens are its prompt and its scored tokens from index `prefill` on are fed one
    decode step at a time. With stride <= window - prefill that is every token after the
    text's first `prefill`."""
    wins = [(w, min(n, len(w) - prefill)) for w, n in windows(ids, window, stride)]
    wins = [(w, n) for w, n in wins if n > 0]
    nll, count = 0.0, 0
    for (w, n), lps in zip(wins, llm.score_decode([w for w, _ in wins], prefill)):
        nll -= sum(lps[-n:])
        count += n
    return nll, count
