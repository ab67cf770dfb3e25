"""What a mixture-of-experts layer costs: the experts a step touches, the bytes that moves and
the GEMMs it runs (used by costmodel's layer terms).

With routing spread over the E experts (the uniform draw of dummy models; real routers are
close to it over a batch), T routed tokens of top-k touch E * (1 - (1 - k/E)^T) experts in
expectation. Experts off the compute device move only when touched, once per block
(engine/experts.py), so a layer's streamed bytes are its dense part plus the touched share of
its experts; the expert GEMMs run over the touched experts, each on its share of the rows.
"""
from __future__ import annotations

from dataclasses import dataclass

from flexrun.config import Policy
from flexrun.memory.pinned import H2D_CHUNK
from flexrun.models.spec import ModelSpec
from flexrun.plan.footprint import expert_of, numel, weight_bytes


@dataclass
class MoELayer:
    """Sizes of one MoE decoder layer."""
    experts: int
    top_k: int
    expert_bytes: float         # one expert's stored bytes (gate, up, down)
    expert_params: int          # one expert's parameters
    dense_bytes: float          # the rest of the layer (attention, norms, router, shared)
    share: float                # MoE layers / decoder layers
    expert_copies: int = 2      # host->GPU copies that move one expert (gate;up and down,
    #                             in pieces of at most H2D_CHUNK bytes; 4-bit: 3 per tensor)

    def touched(self, tokens: float) -> float:
        """Expected experts that `tokens` routed tokens touch."""
        if tokens <= 0:
            return 0.0
        return self.experts * (1.0 - (1.0 - self.top_k / self.experts) ** tokens)

    def moved_share(self, tokens: float) -> float:
        """The share of the layer's bytes a block of `tokens` routed tokens needs moved."""
        total = self.dense_bytes + self.experts * self.expert_bytes
        return (self.dense_bytes + self.touched(tokens) * self.expert_bytes) / total

    def uses(self, rows: int, batches: int) -> float:
        """Of a block of `batches` GPU batches of `rows` tokens, the batches that read each
        touched expert on average: a copy serves them all, the CPU lane computes it again in
        each."""
        return batches * self.touched(rows) / max(self.touched(rows * batches), 1e-9)

    def expert_rows(self, rows: int) -> tuple[float, float]:
        """(experts touched, rows per touched expert) of one GPU batch of `rows` tokens."""
        n = self.touched(rows)
        return n, (rows * self.top_k / n if n else 0.0)


def moe_layer(spec: ModelSpec, policy: Policy, elem: int) -> MoELayer | None:
    """The MoE layer of `spec` (its first), None for a dense model."""
    if not spec.num_experts:
        return None
    j = spec.first_moe_layer
    shapes = spec.unit_shapes(j + 1)
    expert, dense = 0.0, 0.0
    params = copies = 0
    for n, s in shapes.items():
        b = weight_bytes(n, s, elem, policy)
        if expert_of(n) is None:
            dense += b
        elif expert_of(n).endswith(".experts.0"):
            expert += b
            params += numel(s)
            if policy.compress_weight and len(s) == 2:
                copies += 3                 # codes, mins, scales
            elif not n.endswith(".up.weight"):  # gate and up lie, and cross, as one
                copies += -(-int(b * (2 if n.endswith(".gate.weight") else 1)) // H2D_CHUNK)
    moe = sum(spec.is_moe(i) for i in range(spec.num_layers))
    return MoELayer(spec.num_experts, spec.experts_per_token, expert, params, dense,
                    moe / spec.num_layers, max(copies, 1))


def cpu_lane_bps(policy: Policy, prof, cuda: bool) -> float:
    """Weight bytes/s of the CPU lane beside the copies (engine/experts.py computes host
    experts where they live): 0 on a CPU run, on the copy lane alone, and under auto for
    4-bit experts, which the host dequantizes first (0.5 GB/s of codes against 54 GB/s
    copied on the H100 host, S6q), as the engine's split does."""
    if not cuda or policy.expert_lanes == "copy" or (policy.compress_weight and
                                                     policy.expert_lanes == "auto"):
        return 0.0
    return prof.cpu_expert_bw or 0.0
