"""Input-channel activation statistics of every linear weight, without data: the model runs
on random token ids, layer by layer as the checkpoint's tensors arrive, and each linear
records the mean square of its input per channel (the weight search of memory/wquant.py
weighs a channel's error by it). A few channels of the residual stream carry most of the
activation energy whatever the text ("massive activations"), so random tokens find them.

The model object (models/*: embed, pre_attn, post_attn) is handed in; attention runs as
plain causal SDPA (a sliding window or soft cap is ignored: statistics only)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

ROWS, SEQ, SEED = 4, 256, 0     # random sequences x tokens


class _Recorder(TorchFunctionMode):
    """Sums x^2 per input channel of every F.linear (and fused addmm) whose weight is one of
    `names` (by data pointer)."""

    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names, self.sums, self.counts = names, {}, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        w = x = None
        if func is F.linear and len(args) >= 2:
            x, w = args[0], args[1]
        elif func is torch._addmm_activation and len(args) >= 3:
            x, w = args[1], args[2]
        if isinstance(w, torch.Tensor) and w.data_ptr() in self.names:
            name = self.names[w.data_ptr()]
            x2 = x.detach().float().reshape(-1, x.shape[-1])
            self.sums[name] = self.sums.get(name, 0) + x2.square().sum(0)
            self.counts[name] = self.counts.get(name, 0) + x2.shape[0]
        return func(*args, **kwargs)


def activation_stats(spec, model, tensors, device: torch.device, dtype: torch.dtype,
                     compressible) -> dict[str, torch.Tensor]:
    """name -> (in_features,) mean square input of each compressible linear weight.

    tensors: the checkpoint's (name, tensor) pairs in any order (a unit's tensors are held
    until the unit is complete and its predecessors have run); compressible(name, shape)."""
    L = spec.num_layers
    need = {u: set(spec.unit_shapes(u)) for u in range(L + 1)}
    unit_of = {}
    for u in range(L, -1, -1):          # a tensor shared by units belongs to the first
        for n in need[u]:
            unit_of[n] = u
    held: dict[int, dict] = {u: {} for u in range(L + 1)}
    g = torch.Generator().manual_seed(SEED)
    seq = min(SEQ, spec.max_positions)
    ids = torch.randint(0, spec.vocab_size, (ROWS, seq), generator=g).to(device)
    pos = torch.arange(seq, device=device).expand(ROWS, seq)
    h, nxt = None, 0
    rec = _Recorder({})
    for name, t in tensors:
        u = unit_of.get(name)
        if u is None:
            continue
        for v in range(u, L + 1):       # shared tensors (tied embeddings) serve every unit
            if name in need[v]:
                held[v][name] = t.to(device, dtype)
        while nxt <= L and len(held[nxt]) == len(need[nxt]):
            w = held.pop(nxt)
            if nxt == 0:
                h = model.embed(w, ids, pos, dtype)
            else:
                h = _layer(spec, model, w, h, pos, nxt - 1, rec, compressible)
            nxt += 1
    return {n: rec.sums[n] / rec.counts[n] for n in rec.sums}


def _layer(spec, model, w: dict, h: torch.Tensor, pos: torch.Tensor, j: int, rec: _Recorder,
           compressible) -> torch.Tensor:
    prefix = f"layers.{j}."
    local = {n[len(prefix):]: t for n, t in w.items()}
    rec.names = {t.data_ptr(): n for n, t in w.items() if compressible(n, t.shape)}
    with torch.no_grad(), rec:
        q, k, v = (x.transpose(1, 2) for x in model.pre_attn(local, h, pos, j))
        opts = spec.attention(j)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=opts.scale,
                                           enable_gqa=k.shape[1] != q.shape[1])
        a = a.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1)
        return model.post_attn(local, h, a)
