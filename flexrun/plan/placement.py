"""Lay a model's weights out on the tiers its policy plans (footprint.weight_layout): each
tensor read from the checkpoint once, cast, compressed or packed where the policy says, put
on its tier, then the tensors a layer multiplies as one joined (LlamaModel.JOINED)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flexrun.config import Policy
from flexrun.memory import packed as packed_weights
from flexrun.memory.storage import TIERS, TieredStore, split_report
from flexrun.memory.wquant import weight_quantizer
from flexrun.models.llama import model_for
from flexrun.models.moe import load_expert_tokens
from flexrun.plan.footprint import is_compressible, weight_layout


@dataclass
class Placed:
    """What placing the weights reports."""
    weights_split: dict             # percent of the bytes per tier
    quant_s: float = 0.0            # 4-bit weight search at load (or its cache read)
    quant_cached: bool = False


def place_weights(ckpt, policy: Policy, weights: TieredStore, device: torch.device,
                  dtype: torch.dtype, units: range, expert_stats: str | None = None) -> Placed:
    """Fill `weights` with the checkpoint's tensors of `units` where `policy` plans them.
    expert_stats: a MoE run's routing counts (MoEStats.save) for its hot-expert placement."""
    spec, p = ckpt.spec, policy
    elem = dtype.itemsize
    hot = load_expert_tokens(expert_stats, spec) if spec.num_experts and expert_stats \
        and Path(expert_stats).is_file() else None
    shapes, sizes, tiers = weight_layout(spec, p, elem, units, device.type == "cuda", hot)
    names = list(shapes)
    tier_of = {n: TIERS[t] for n, t in zip(names, tiers)}

    def device_for(name: str) -> torch.device:
        # compressed weights are compressed on the compute device whatever their tier
        squeeze = p.compress_weight and is_compressible(name, shapes[name])
        direct = squeeze or (tier_of[name] == "gpu" and not p.compress_weight)
        return device if direct else torch.device("cpu")
    packs = packed_weights.applies(device, dtype, p.compress_weight)
    quant = weight_quantizer(ckpt, p, device, dtype, shapes, is_compressible, model_for(spec),
                             units) if p.compress_weight else None
    # the tensors a layer multiplies as one (LlamaModel.JOINED) are joined as soon as the
    # last of them is placed: the parts' memory is freed while the load goes on and serves
    # the next layers' tensors (joined at the end, a CPU run's RSS kept ~40% of the weights
    # more than they take: the freed parts stayed in the heap)
    model = model_for(spec)
    groups = [[f"layers.{j}.{g}.{part}" for g in group]
              for j in (u - 1 for u in units if 1 <= u <= spec.num_layers)
              for group in model.JOINED for part in ("weight", "bias")]
    waiting = {n: g for g in groups if all(n in shapes for n in g) for n in g}
    for name, t in ckpt.iter_tensors(device_for, set(names)):
        t = t.to(dtype)
        if p.compress_weight and is_compressible(name, t.shape):
            t = quant(name, t.to(device))
        elif packs and is_compressible(name, t.shape):
            t = packed_weights.pack(t, p.gpu_batch_size)
        weights.put(name, t, tier_of[name])
        del t
        group = waiting.get(name)
        if group is not None and all(n in weights.homes for n in group):
            weights.join(group)
    placed = Placed(split_report(sizes, tiers))
    if quant is not None:
        placed.quant_s, placed.quant_cached = quant.finish(), quant.hit
    if device.type == "cuda":      # the joined tensors' old blocks stay cached
        torch.cuda.empty_cache()
    return placed
