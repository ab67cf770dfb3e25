"""Requests -> rows -> batches, and finished rows -> outputs.

A request (one prompt with its SamplingParams) becomes n rows, one per sample. Rows of one
request in one GPU batch share a single prefill: the batch computes each distinct prompt once
and copies its KV cache and first logits into its rows (BatchState.fork)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from flexrun.config import FlexrunError, SamplingParams
from flexrun.engine.batch_state import BatchState
from flexrun.engine.sampling import Row, cut_at_stop


@dataclass
class TokenLogprob:
    """A token's log-probability (log-softmax of the model's logits) and the top k there."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Sample:
    """One of a request's n completions."""
    output_ids: list[int]
    text: str | None
    finish_reason: str                          # "stop" or "length"
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    """One prompt's result. output_ids are the generated ids only (a stop token included);
    samples holds all n completions (samples[0] is output_ids / text / finish_reason)."""
    index: int
    prompt_ids: list[int]
    output_ids: list[int]
    text: str | None
    finish_reason: str
    samples: list[Sample] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


def request_rows(order: list[int], params: list[SamplingParams], limits: list[int],
                 forced: list[list[int]] | None = None
                 ) -> tuple[list[tuple[int, int]], dict[int, Row]]:
    """Rows (request, sample) in `order`, the samples of a request side by side, and the
    sampler's view of each row (forced: each request's given tokens, teacher forcing)."""
    rows = [(i, j) for i in order for j in range(params[i].n)]
    table = {r: Row(params[i], j, limits[i], forced[i] if forced else None)
             for r, (i, j) in enumerate(rows)}
    return rows, table


def forced_requests(sequences, prefill: int
                    ) -> tuple[list[list[int]], list[SamplingParams], list[list[int]]]:
    """Teacher forcing (LLM.score_decode): each token-id sequence as a prompt of its first
    `prefill` tokens and its other tokens given, one per decode step, with their
    log-probabilities kept; EOS does not stop a row."""
    seqs = [[int(x) for x in s] for s in sequences]
    if prefill < 1 or any(len(s) <= prefill for s in seqs):
        raise FlexrunError(f"score_decode: every sequence needs more than prefill={prefill} "
                           "tokens (and prefill >= 1)")
    forced = [s[prefill:] for s in seqs]
    params = [SamplingParams(ignore_eos=True, logprobs=True, max_tokens=len(f))
              for f in forced]
    return [s[:prefill] for s in seqs], params, forced


def make_batch(members: list[int], rows: list[tuple[int, int]], ids: list[list[int]],
               gen: int, pad: int, device: torch.device, share_prefill: bool,
               prompt_lp_k: int | None) -> BatchState:
    """A left-padded GPU batch of rows `members`; samples of one request share its prefill."""
    reqs = [rows[m][0] for m in members]
    P = max(len(ids[i]) for i in reqs)
    lens = torch.tensor([len(ids[i]) for i in reqs])
    valid = torch.zeros(len(members), P + gen, dtype=torch.bool)
    valid[:, :P] = torch.arange(P)[None, :] >= (P - lens)[:, None]
    b = BatchState(indices=members,
                   ids=torch.tensor([[pad] * (P - len(ids[i])) + ids[i] for i in reqs]).to(device),
                   valid=valid.to(device), prompt_len=P, padded=bool((lens < P).any()),
                   next_pos=lens.to(device), outputs=[[] for _ in members],
                   done=[False] * len(members), prompt_lp_k=prompt_lp_k)
    distinct = list(dict.fromkeys(reqs))
    if share_prefill and len(distinct) < len(reqs):
        first = {r: reqs.index(r) for r in distinct}
        b.pre = torch.tensor([first[r] for r in distinct], device=device)
        b.fork = torch.tensor([distinct.index(r) for r in reqs], device=device)
    return b


def prefill_rows(b: BatchState) -> int:
    """How many prompts the batch's prefill computes."""
    return b.ids.shape[0] if b.pre is None else b.pre.shape[0]


def row_sample(b: BatchState, n: int, params: SamplingParams, decode) -> Sample:
    """Row n of batch b as a Sample: text cut before a stop string, logprobs where asked."""
    out = list(b.outputs[n])
    text = decode(out) if decode is not None else None
    reason = b.finish[n] or "length"
    if text is not None and params.stop:
        text, _ = cut_at_stop(text, params.stop)
    lps = None
    if params.logprobs:
        lps = [TokenLogprob(t, lp, top[:params.top_logprobs])
               for t, (lp, top) in zip(out, b.logprobs[n])]
    return Sample(out, text, reason, lps)


def prompt_logprob_list(b: BatchState, n: int, prompt: list[int], k: int
                        ) -> list[TokenLogprob | None]:
    """Row n's prompt log-probabilities: None for the first token, then each token's."""
    lp, top_ids, top_lp = b.prompt_lp
    u = n if b.fork is None else int(b.fork[n])
    P, L = b.prompt_len, len(prompt)
    out: list[TokenLogprob | None] = [None]
    for m in range(1, L):
        at = P - L + m - 1
        top = [] if not k else list(zip(top_ids[u, at, :k].tolist(), top_lp[u, at, :k].tolist()))
        out.append(TokenLogprob(prompt[m], float(lp[u, at]), top))
    return out


def params_per_prompt(sampling, n: int) -> list[SamplingParams]:
    """One SamplingParams per prompt from one for all (or None) or a sequence."""
    if sampling is None or isinstance(sampling, SamplingParams):
        return [sampling or SamplingParams()] * n
    params = list(sampling)
    if len(params) != n:
        raise FlexrunError(f"{len(params)} SamplingParams for {n} prompts: give one for "
                           "all or one per prompt")
    return params


def fit_positions(ids: list[list[int]], new_tokens: list[int], limit: int, names,
                  truncate: bool) -> None:
    """Check (or left-truncate) every prompt, with its own cap on new tokens, against the
    model's `limit` positions."""
    for i, (x, gen) in enumerate(zip(ids, new_tokens)):
        if gen >= limit:
            raise FlexrunError(f"max_new_tokens {gen} leaves no room for a prompt in "
                               f"the model's {limit} positions")
        if len(x) + gen > limit:
            if truncate:
                ids[i] = x[len(x) + gen - limit:]
                continue
            raise FlexrunError(f"prompt {names[i]!r} has {len(x)} tokens; with "
                               f"max_new_tokens {gen} it exceeds the model's "
                               f"{limit} positions: shorten it or pass --truncate left")


def progress_bar(enabled: bool, total: int):
    """A tqdm bar over prompts, or None."""
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="prompt", desc="generate")
