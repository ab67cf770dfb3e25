"""Pipeline stages: the units (embedding, decoder layers, head) cut into contiguous slices.

Each slice is one stage, run by one process on one GPU. The cut minimises the costliest
stage, where a unit's cost is the bytes of its weights as stored (4-bit when compressed): the
time a stage spends streaming weights, and a fair proxy for its decode compute.
"""
from __future__ import annotations

import torch

from flexrun.config import FlexrunError, Policy
from flexrun.plan.footprint import weight_bytes
from flexrun.models.spec import ModelSpec


def unit_costs(spec: ModelSpec, policy: Policy, dtype: torch.dtype) -> list[int]:
    """Stored weight bytes of every unit (a tied embedding counts in both units using it)."""
    elem = dtype.itemsize
    return [sum(weight_bytes(n, s, elem, policy) for n, s in spec.unit_shapes(u).items())
            for u in range(spec.num_units)]


def split_units(costs: list[int], stages: int) -> list[range]:
    """Contiguous, non-empty unit ranges, one per stage, minimising the largest stage cost
    (exact, by dynamic programming over the cut points)."""
    n = len(costs)
    if stages < 1:
        raise FlexrunError(f"--gpus must be >= 1, got {stages}")
    if stages > n:
        raise FlexrunError(f"--gpus {stages} exceeds the model's {n} units (embedding, "
                           f"{n - 2} layers, head): use at most {n} GPUs")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest max stage cost of the first i units in k stages; cut[k][i]: where
    # the k-th stage starts in that optimum
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    out, i = [], n
    for k in range(stages, 0, -1):
        out.append(range(cut[k][i], i))
        i = cut[k][i]
    return out[::-1]


def plan_stages(spec: ModelSpec, dtype: torch.dtype, stages: int,
                compress_weight: bool = False) -> list[range]:
    """The cut of the model into `stages` slices (by weight bytes, 4-bit if compressed)."""
    return split_units(unit_costs(spec, Policy(compress_weight=compress_weight), dtype), stages)


def describe(spec: ModelSpec, units: range) -> str:
    """A stage's units in words, e.g. 'embedding + layers 0-11'."""
    parts = []
    layers = [u - 1 for u in units if 1 <= u <= spec.num_layers]
    if units[0] == 0:
        parts.append("embedding")
    if layers:
        parts.append(f"layer {layers[0]}" if len(layers) == 1 else
                     f"layers {layers[0]}-{layers[-1]}")
    if units[-1] == spec.num_units - 1:
        parts.append("head")
    return " + ".join(parts)


def split_groups(micro_batches: int, stages: int) -> list[range]:
    """min(M, K) contiguous groups of the M micro-batches, sizes differing by at most one."""
    g = min(micro_batches, stages)
    edges = [i * micro_batches // g for i in range(g + 1)]
    return [range(a, b) for a, b in zip(edges, edges[1:])]


def bubble_fraction(stages: int, groups: int) -> float:
    """Idle share of one pass of G groups of micro-batches through K stages: (K-1)/(K+G-1)."""
    return (stages - 1) / (stages + groups - 1)
