"""What a step leaves in each row of a batch: its token, whether and why it stopped (stop id,
stop string, its token cap), its log-probabilities; and the prompt's log-probabilities,
computed in chunks of positions so no (positions x vocab) tensor of a whole prompt exists."""
from __future__ import annotations

import torch

from flexrun.engine.sampling import Picked, Sampler

PROMPT_CHUNK = 64       # prompt positions per head matmul when scoring a prompt


def append_tokens(b, ids: list[int], sampler: Sampler, picked: Picked | None = None) -> None:
    """Append one step's ids to b's unfinished rows and mark the rows that stop."""
    for i, t in enumerate(ids):
        if b.done[i]:
            continue
        row = b.indices[i]
        out = b.outputs[i]
        out.append(t)
        if picked is not None:
            top = ([] if picked.top_ids is None else
                   list(zip(picked.top_ids[i].tolist(), picked.top_logprobs[i].tolist())))
            b.logprobs[i].append((float(picked.logprob[i]), top))
        if t in sampler.stops(row) or sampler.stop_string_hit(row, out) is not None:
            b.done[i], b.finish[i] = True, "stop"
        elif sampler.limit(row) is not None and len(out) >= sampler.limit(row):
            b.done[i], b.finish[i] = True, "length"


def prompt_logprobs(model, w: dict, h: torch.Tensor, ids: torch.Tensor, k: int) -> tuple:
    """Each prompt position's next-token log-probability and the top k, from the last hidden
    states h (b, P, hidden) and the prompt ids (b, P): (b, P-1) logprobs of ids[:, 1:],
    (b, P-1, k) top ids and their logprobs, on the host. The head runs PROMPT_CHUNK positions
    at a time."""
    b, P = ids.shape
    lp_all, ids_all, top_all = [], [], []
    for c0 in range(0, P - 1, PROMPT_CHUNK):
        c1 = min(c0 + PROMPT_CHUNK, P - 1)
        lp = torch.log_softmax(model.head(w, h[:, c0:c1]).float(), dim=-1)
        lp_all.append(lp.gather(-1, ids[:, c0 + 1:c1 + 1, None].to(lp.device))[..., 0].cpu())
        if k:
            top = lp.topk(k, dim=-1)
            ids_all.append(top.indices.cpu())
            top_all.append(top.values.cpu())
    empty = torch.zeros(b, 0)
    cat = (lambda xs: torch.cat(xs, 1) if xs else None)
    return (cat(lp_all) if lp_all else empty, cat(ids_all), cat(top_all))
