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
    hot: bool = False               # MoE experts placed by routing counts (expert_stats)


class JoinedSlots:
    """The rows of each tensor in its joined buffer (TieredStore.join's result, laid out
    ahead): for every group whose members all go to the compute device with one dtype and
    row width, the largest such group holding them (a layer's experts, not each expert's
    gate/up pair). The buffer is allocated when its first member arrives."""

    def __init__(self, groups: list[list[str]], shapes: dict, tier_of: dict,
                 dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.rows: dict[str, tuple[int, int, int]] = {}    # name -> (group, start, end)
        self.groups: list[list[str]] = []
        self.buffers: dict[int, torch.Tensor] = {}
        for g in sorted(groups, key=len, reverse=True):
            if len(g) < 2 or any(n in self.rows or tier_of[n] != "gpu" for n in g) or \
                    len({tuple(shapes[n][1:]) for n in g}) != 1:
                continue
            start = 0
            for n in g:
                self.rows[n] = (len(self.groups), start, start + shapes[n][0])
                start += shapes[n][0]
            self.groups.append(g)

    def __contains__(self, name: str) -> bool:
        return name in self.rows

    def covers(self, group: list[str]) -> bool:
        """Whether `group` lies inside one laid-out buffer (its join happened ahead)."""
        return all(n in self.rows for n in group) and \
            len({self.rows[n][0] for n in group}) == 1

    def fill(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """t copied into its rows of its group's buffer; that view."""
        k, a, b = self.rows[name]
        buf = self.buffers.get(k)
        if buf is None:
            g = self.groups[k]
            total = self.rows[g[-1]][2]
            buf = self.buffers[k] = torch.empty((total, *t.shape[1:]), dtype=self.dtype,
                                                device=self.device)
        view = buf[a:b]
        view.copy_(t)
        return view


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
    groups = [g for g in groups if all(n in shapes for n in g)]
    # groups whose joined buffer can be laid out before the load (plain tensors on the
    # compute device): each tensor is copied straight into its rows, no join copies later
    plain = not p.compress_weight and not packs
    slots = JoinedSlots(groups if plain else [], shapes, tier_of, dtype, device)
    waiting: dict[str, list] = {}       # a name's groups (an expert's gate and up, then the
    for g in groups:                    # layer's experts all together): each joined in turn
        if not slots.covers(g):
            for n in g:
                waiting.setdefault(n, []).append(g)
    if (weights.pin or HOST_RUNS_ON_CPU) and not p.compress_weight and not packs:
        for layer_names in host_expert_runs(spec, units, shapes, tier_of):
            weights.reserve_host(layer_names, [shapes[n] for n in layer_names], dtype)
    for name, t in ckpt.iter_tensors(device_for, set(names)):
        t = t.to(torch.float32 if spec.keeps_fp32(name) else dtype)
        if p.compress_weight and is_compressible(name, t.shape):
            t = quant(name, t.to(device))
        elif packs and is_compressible(name, t.shape):
            t = packed_weights.pack(t, p.gpu_batch_size)
        elif name in slots:
            t = slots.fill(name, t)
        weights.put(name, t, tier_of[name])
        del t
        for group in waiting.get(name, ()):
            if all(n in weights.homes for n in group):
                weights.join(group)
    weights.drop_reserved()
    placed = Placed(split_report(sizes, tiers), hot=hot is not None)
    if quant is not None:
        placed.quant_s, placed.quant_cached = quant.finish(), quant.hit
    if device.type == "cuda":      # the joined tensors' old blocks stay cached
        torch.cuda.empty_cache()
    return placed


HOST_RUNS_ON_CPU = False    # tests: lay host experts out as on a GPU run (staged there only)


def host_expert_runs(spec, units, shapes: dict, tier_of: dict) -> list[list[str]]:
    """Per MoE layer, its host-tier experts' gate and up weights in expert order, then their
    down weights: the order of the staging slots (engine/expert_staging.py: W1[e] = gate;up,
    W2[e] = down), so that a run of experts staged together crosses in one copy."""
    runs = []
    for j in (u - 1 for u in units if 1 <= u <= spec.num_layers):
        if not spec.is_moe(j):
            continue
        name = lambda e, part: f"layers.{j}.experts.{e}.{part}.weight"  # noqa: E731
        host = [e for e in range(spec.num_experts)
                if all(tier_of.get(name(e, q)) == "cpu" for q in ("gate", "up", "down"))]
        if host:
            runs.append([name(e, q) for e in host for q in ("gate", "up")] +
                        [name(e, "down") for e in host])
    return runs
