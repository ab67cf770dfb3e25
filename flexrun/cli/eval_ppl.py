"""`flexrun eval-ppl`: perplexity of a text file with a sliding window."""
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
    with open_llm(args) as llm:
        if llm.tokenizer is None:
            raise FlexrunError(f"{args.model} has no tokenizer: eval-ppl needs text input")
        ids = llm.tokenizer.encode(path.read_text(encoding="utf-8")).ids
        nll, count = perplexity_terms(llm, ids, args.window, args.stride)
    ppl = math.exp(nll / max(count, 1))
    print(json.dumps({"model": args.model, "text": str(path), "tokens": count,
                      "window": args.window, "stride": args.stride, "ppl": ppl}))
    return 0


def perplexity_terms(llm: LLM, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Sum of token NLLs and the number of scored tokens, HF-style sliding window."""
    windows, targets, prev_end = [], [], 0
    for begin in range(0, max(len(ids) - 1, 1), stride):
        end = min(begin + window, len(ids))
        windows.append(ids[begin:end])
        targets.append(end - prev_end if begin else end - 1)   # tokens scored in this window
        prev_end = end
        if end == len(ids):
            break
    nll, count = 0.0, 0
    for w, logits, n in zip(windows, llm.prompt_logits(windows), targets):
        lp = torch.log_softmax(logits[:-1].double(), -1)
        tgt = torch.tensor(w[1:])
        tok_nll = -lp.gather(-1, tgt[:, None])[:, 0]
        nll += float(tok_nll[-n:].sum())
        count += n
    return nll, count
