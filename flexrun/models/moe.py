"""The mixture-of-experts MLP of one decoder layer, as a function of handed-in weights.

Router logits -> top-k experts and their weights (as the family computes them: ModelSpec
.router_kind) -> the (token, slot) pairs sorted by expert, one gated-MLP GEMM per expert that
received tokens, over all of its tokens -> weighted combine in expert order per token;
Qwen2-MoE adds a shared expert scaled by sigmoid(shared_gate(x)). Every weight goes through
common.linear, so experts may arrive 4-bit compressed or packed, from any tier.

Dummy models draw each token's experts from a stated distribution instead (ModelSpec.routing:
uniform or zipf:<s>), as a seeded hash of the token's hidden state: the same token in the same
context gets the same experts on every run, different tokens draw independently.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from flexrun.config import FlexrunError
from flexrun.kernels import routing as routing_kernel
from flexrun.models.common import dense, linear, linear_rows
from flexrun.models.moe_grouped import (GROUPED_MAX_BYTES, Activation, grouped_experts,
                                        grouped_ready, silu_mul,
                                        stacked_biases, stacked_experts)
from flexrun.models.spec import ModelSpec


class MoEStats:
    """What the routers chose, summed over the MoE layer calls of a run, per layer. The sums
    stay on the compute device (no host sync while running; CUDA graph replays add to them
    too) and are read when asked for; `save` writes them for a later run's placement (hot
    experts on the GPU: plan.footprint.moe_tiers)."""

    def __init__(self, routing: str = "router", num_layers: int = 1):
        self.routing = routing      # router | uniform | zipf:<s> (the benchmark reports it)
        self.num_layers = num_layers
        self._calls = self._touched = self._tokens = None

    def record(self, counts: torch.Tensor, layer: int | None = None) -> None:
        """One MoE layer call; counts: (E,) (token, slot) pairs routed to each expert."""
        if self._tokens is None:
            z = torch.zeros((), dtype=torch.long, device=counts.device)
            self._calls, self._touched = z, z.clone()
            self._tokens = torch.zeros((self.num_layers, counts.numel()), dtype=torch.long,
                                       device=counts.device)
        self._calls += 1
        self._touched += (counts > 0).sum()
        self._tokens[layer or 0] += counts

    @property
    def calls(self) -> int:
        """MoE layer calls (one layer on one batch)."""
        return 0 if self._calls is None else int(self._calls)

    @property
    def experts_touched(self) -> int:
        """Experts that received at least one token, summed over the calls."""
        return 0 if self._touched is None else int(self._touched)

    @property
    def expert_tokens(self) -> list[int]:
        """(token, slot) pairs routed to each expert, summed over the calls and layers."""
        return [] if self._tokens is None else self._tokens.sum(0).tolist()

    @property
    def layer_tokens(self) -> list[list[int]]:
        """(token, slot) pairs routed to each expert of each layer (0-based layers)."""
        return [] if self._tokens is None else self._tokens.tolist()

    def save(self, path, model: str = "") -> None:
        """Write the per-layer counts as JSON (read back by load_expert_tokens)."""
        Path(path).write_text(json.dumps({"model": model, "routing": self.routing,
                                          "layer_tokens": self.layer_tokens}) + "\n")

    def reset(self) -> None:
        for t in (self._calls, self._touched, self._tokens):
            if t is not None:
                t.zero_()


def load_expert_tokens(path, spec: ModelSpec) -> list[list[int]]:
    """The per-layer expert token counts saved by MoEStats.save, checked against `spec`."""
    try:
        counts = json.loads(Path(path).read_text())["layer_tokens"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FlexrunError(f"expert statistics {path}: not readable ({e}); write them with "
                           "--expert-stats FILE on a run of this model (generate writes "
                           "them)")
    if len(counts) != spec.num_layers or any(len(c) != spec.num_experts for c in counts):
        raise FlexrunError(f"expert statistics {path} are for another model shape (need "
                           f"{spec.num_layers} layers x {spec.num_experts} experts)")
    return counts


def expert_activation(spec: ModelSpec) -> Activation:
    """The gated activation of the spec's experts (ModelSpec.expert_act): silu(gate) * up, or
    gpt-oss's (up + 1) * gate * sigmoid(alpha * gate) with gate <= limit, |up| <= limit."""
    if spec.expert_act == "silu":
        return silu_mul
    alpha, limit = spec.swiglu_alpha, spec.swiglu_limit

    def swiglu_clamp(g: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        g = g.clamp(max=limit)
        return (up.clamp(-limit, limit) + 1) * (g * torch.sigmoid(g * alpha))
    return swiglu_clamp


def plain_experts(spec: ModelSpec) -> bool:
    """Experts the staging slots run: silu-gated, without biases, weighted on their output."""
    return spec.expert_act == "silu" and not spec.expert_bias and not spec.expert_input_scaled


def route(x: torch.Tensor, w_router, spec: ModelSpec, bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, experts), each (T, k), of the tokens x (T, hidden). The softmax is in fp32;
    Qwen casts the weights back to the run's dtype, Mixtral keeps them fp32 (its expert outputs
    are scaled in fp32, then cast), as transformers does. bias: the router's (gpt-oss)."""
    if spec.routing != "router":
        return drawn_experts(x, spec.num_experts, spec.experts_per_token, spec.routing)
    if spec.router_kind == "sigmoid_group":
        return _sigmoid_group(x, w_router, spec, bias)
    if spec.router_kind == "sigmoid_topk":       # Llama 4: sigmoid of the top-k logits
        top, idx = linear(x, w_router).topk(spec.experts_per_token, -1)
        return torch.sigmoid(top.float()).to(x.dtype), idx
    probs = torch.softmax(linear(x, w_router, bias).float(), -1)
    top, idx = probs.topk(spec.experts_per_token, -1)
    if spec.router_kind == "topk_softmax" or spec.norm_topk_prob:
        top = top / top.sum(-1, keepdim=True)
    if spec.router_kind == "softmax_topk":
        top = top.to(x.dtype)
    return top, idx


def _sigmoid_group(x: torch.Tensor, w_router, spec: ModelSpec, correction: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM-4.5's router (DeepSeek-V3's), in fp32: sigmoid scores; the experts chosen by scores
    + correction, top-k within the topk_group groups whose two best such scores sum highest;
    their plain scores as weights, renormalised (norm_topk_prob), times routed_scaling."""
    E, k, G = spec.num_experts, spec.experts_per_token, spec.n_group
    scores = torch.sigmoid(F.linear(x.float(), dense(w_router).float()))
    choice = scores + correction.float()
    if G > 1:
        groups = choice.view(-1, G, E // G).topk(2, -1).values.sum(-1)
        keep = torch.zeros_like(groups).scatter_(
            1, groups.topk(spec.topk_group, -1, sorted=False).indices, 1.0)
        choice = choice.masked_fill(~keep.bool().repeat_interleave(E // G, 1), float("-inf"))
    idx = choice.topk(k, -1, sorted=False).indices
    top = scores.gather(1, idx)
    if spec.norm_topk_prob:
        top = top / (top.sum(-1, keepdim=True) + 1e-20)
    return top * spec.routed_scaling, idx


@dataclass
class ExpertGroup:
    """The tokens routed to one expert in one MoE call: their rows of the call's input and
    their routing weights."""
    expert: int
    rows: torch.Tensor          # (n,) long, rows of x2
    weights: torch.Tensor       # (n,) routing weights
    n: int = -1                 # len(rows), kept as an int (len of a tensor costs ~1 us)

    def __post_init__(self) -> None:
        if self.n < 0:
            self.n = len(self.rows)


def run_here(x2: torch.Tensor, w: dict, groups: list[ExpertGroup], out: torch.Tensor,
             act: Activation | None = None, scale_input: bool = False) -> None:
    """Every expert of `groups` from the weights in w, one GEMM each over all of its tokens,
    weighted and added to out (the engine's runner does the same with experts fetched from
    their tiers, or computed where they live: engine/experts.py)."""
    add_expert_outputs(out, groups, [weighted_expert(x2, w, g, act, scale_input)
                                     for g in groups])


# the share of a split layer's experts a block's GPU batches are expected to touch from which
# all of them are staged on the device and run as one grouped GEMM (engine/experts.py
# TieredExperts.stack; the cost model prices such calls on the copy lane alone)
STAGE_ALL = 0.9

def touches_nearly_all(spec: ModelSpec, rows: int) -> bool:
    """Whether a call of `rows` tokens is expected to touch STAGE_ALL of the experts (with
    routing spread over them: E * (1 - (1 - k/E)^rows) touched)."""
    E, k = spec.num_experts, spec.experts_per_token
    return 1 - (1 - k / E) ** rows >= STAGE_ALL


def grouped_fits(spec: ModelSpec, rows: int, elem: int) -> bool:
    """Whether a call of `rows` tokens runs its experts as grouped GEMMs over every routed
    pair within GROUPED_MAX_BYTES of workspace (longer prefills loop over the experts)."""
    work = rows * spec.experts_per_token * (3 * spec.expert_ffn_dim + 5 * spec.hidden_size)
    return work * elem <= GROUPED_MAX_BYTES


# above this much workspace (prefill) the outputs are added expert by expert: on a CPU the
# gather costs more than the launches it saves (fp16, 1024 x 8 x 2048: 27 ms vs 7.5 ms)
COMBINE_MAX_BYTES = 8 << 20


def add_expert_outputs(out: torch.Tensor, groups: list[ExpertGroup],
                       ys: list[torch.Tensor]) -> None:
    """out[g.rows] += y for each group (ascending experts, every token's k pairs among them)
    and its weighted output y: each token's outputs added in ascending expert order, as
    every path adds them. Small calls (decode) gather the outputs token by token and add
    them in k adds rather than a launch per expert; the sums are the same, bit for bit."""
    T, n = out.shape[0], sum(g.n for g in groups)
    k = n // T if T else 0
    if k and n == T * k and n * out.shape[1] * out.element_size() <= COMBINE_MAX_BYTES:
        by_token = torch.cat([g.rows for g in groups]).argsort(stable=True)
        y = torch.cat(ys)[by_token].to(out.dtype).view(T, k, -1)
        for j in range(k):
            out.add_(y[:, j])
        return
    for g, y in zip(groups, ys):
        out.index_add_(0, g.rows, y.to(out.dtype))


def weighted_expert(x2: torch.Tensor, w: dict, g: ExpertGroup,
                    act: Activation | None = None, scale_input: bool = False) -> torch.Tensor:
    """Expert g.expert over its tokens' rows of x2, scaled by their routing weights (its
    output, or with scale_input its input: Llama 4)."""
    return scaled_expert(x2[g.rows], w, f"experts.{g.expert}.", g.weights, act, scale_input)


def scaled_expert(x: torch.Tensor, w: dict, prefix: str, weights: torch.Tensor,
                  act: Activation | None = None, scale_input: bool = False) -> torch.Tensor:
    """One expert over the rows x, weighted row by row on its output or its input."""
    if scale_input:
        return expert(x * weights[:, None].to(x.dtype), w, prefix, act)
    return expert(x, w, prefix, act) * weights[:, None]


def moe_mlp(x: torch.Tensor, w: dict, spec: ModelSpec, stats: MoEStats | None = None,
            runner: Callable | None = None, layer: int | None = None) -> torch.Tensor:
    """The MoE MLP of one layer for the normed hidden states x (..., hidden). w holds
    "router.weight", "experts.{e}.gate/up/down.weight" (those of experts no token picks may
    be absent) and Qwen2-MoE's "shared.*" and "shared_gate.weight". runner(x2, w, groups,
    out) computes the routed experts (default run_here: from w); a runner with a
    stack(w, rows) method may hand back all of the layer's experts stacked instead."""
    x2 = x.reshape(-1, x.shape[-1])
    E, k = spec.num_experts, spec.experts_per_token
    act, scale_in = expert_activation(spec), spec.expert_input_scaled
    weight, idx = route(x2, w.get("router.weight"), spec,
                        w.get("router.correction", w.get("router.bias")))
    flat = idx.reshape(-1)
    counts = torch.zeros(E, dtype=torch.long, device=x.device).index_add_(
        0, flat, torch.ones_like(flat))         # no host sync (bincount would take one)
    if stats is not None:
        stats.record(counts, layer)
    out = torch.zeros_like(x2)
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    small = grouped_fits(spec, x2.shape[0], x2.element_size())
    stacked = None
    if small and runner is None:
        stacked = stacked_experts(w, E)
    elif small and not capturing and hasattr(runner, "stack") and plain_experts(spec):
        stacked = runner.stack(w, x2.shape[0])   # every expert staged or held: no host sync
    if grouped_ready(stacked, x2, capturing):
        grouped_experts(x2, stacked, weight, idx, counts, out, act,
                        stacked_biases(w, E) if spec.expert_bias else None, scale_in)
    elif capturing:
        # a CUDA graph cannot wait for the counts: every expert over every token, weighted
        # by its routing weight or 0 (correct, E/k times the work of the grouped path)
        dense = torch.zeros(x2.shape[0], E, dtype=weight.dtype, device=x.device)
        dense.scatter_(1, idx, weight)
        for e in range(E):      # (an unrouted expert's input is 0: no output, no biases)
            y = scaled_expert(x2, w, f"experts.{e}.", dense[:, e], act, scale_in)
            out.add_(y.to(x.dtype))
    else:
        order = flat.argsort(stable=True)   # (token, slot) pairs grouped by expert
        tokens, weights = order // k, weight.reshape(-1)[order]
        groups, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                groups.append(ExpertGroup(e, tokens[start:start + n],
                                          weights[start:start + n], n))
                start += n
        if runner is None:
            run_here(x2, w, groups, out, act, scale_in)
        else:
            runner(x2, w, groups, out)
    if spec.shared_expert_ffn_dim:
        shared = expert(x2, w, "shared.")
        if spec.shared_expert_gate:
            shared = torch.sigmoid(linear(x2, w["shared_gate.weight"])) * shared
        out = out + shared
    return out.view(x.shape)


def expert(x: torch.Tensor, w: dict, prefix: str, act: Activation | None = None
           ) -> torch.Tensor:
    """down(act(gate(x), up(x))) of one expert (gate and up in one GEMM when joined; their
    biases where the model has them); act: silu(gate) * up unless given."""
    g, up = linear_rows(x, [w[prefix + "gate.weight"], w[prefix + "up.weight"]],
                        [w.get(prefix + "gate.bias"), w.get(prefix + "up.bias")])
    return linear((act or silu_mul)(g, up), w[prefix + "down.weight"],
                  w.get(prefix + "down.bias"))


# ---- drawn experts (dummy models) -----------------------------------------------------------
_MASK = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash, elementwise on int64 tensors holding values below 2**32."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK
    return (x >> 16) ^ x


def parse_routing(routing: str) -> float | None:
    """The Zipf exponent of a routing setting (None: uniform); ValueError if not one."""
    kind, _, s = routing.partition(":")
    if kind == "uniform" and not s:
        return None
    if kind == "zipf":
        try:
            v = float(s or 1.0)
        except ValueError:
            v = -1.0
        if v > 0 and math.isfinite(v):
            return v
    raise ValueError(f"routing {routing!r}: use uniform, zipf or zipf:<s> (s > 0)")


def drawn_experts(x: torch.Tensor, E: int, k: int, routing: str, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct experts per token (weights 1/k) drawn from `routing`'s distribution over
    the E experts (uniform, or Zipf: expert e with probability ~ (e + 1)^-s), keyed by a hash
    of the token's hidden state and `seed`: Gumbel top-k (sampling without replacement)."""
    s = parse_routing(routing)
    if routing_kernel.applies(x, E):        # one launch instead of ~50 (kernels/routing.py)
        scores = routing_kernel.FALLBACK.run(lambda: routing_kernel.drawn_scores(x, E, seed, s),
                                             x)
        if scores is not None:
            idx = scores.topk(k, -1).indices
            return torch.full(idx.shape, 1.0 / k, device=x.device), idx
    n = min(x.shape[-1], 16)
    head = x[:, :n].contiguous()
    bits = head.view(torch.int32 if head.element_size() == 4 else torch.int16).long() & _MASK
    coef = torch.arange(n, device=x.device) * 7919 % 65521 * 2 + 1    # products < 2**49
    key = _mix(_mix((bits * coef).sum(-1) & _MASK) ^ (seed & _MASK))
    ids = torch.arange(E, device=x.device)
    u = _mix(key[:, None] ^ (ids * 0x85EBCA6B & _MASK))
    u = ((u >> 8).float() + 0.5) / float(1 << 24)              # (T, E) in (0, 1)
    scores = -torch.log(-torch.log(u))
    if s is not None:
        scores = scores - s * torch.log(ids.float() + 1)
    idx = scores.topk(k, -1).indices
    return torch.full(idx.shape, 1.0 / k, device=x.device), idx
