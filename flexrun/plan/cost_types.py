"""The cost model's data: the workload it predicts for (Workload), its prediction for one
policy (Prediction), a policy search's result (SearchResult), and the linear expressions
(Lin: placement fraction -> coefficient) its time terms are written in.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from flexrun.config import Policy
from flexrun.models.spec import ModelSpec

Lin = dict  # linear expression: variable -> coefficient, "1" -> constant


@dataclass
class Workload:
    prompt_len: int
    gen_len: int
    num_prompts: int | None = None
    units: range | None = None      # the units this device runs (a pipeline stage); all if None

    def unit_counts(self, spec: ModelSpec) -> tuple[int, int, int, int]:
        """How many embedding, decoder-layer and head units the device runs, and (a MoE model
        whose config keeps some layers dense) how many of its layers are dense ones, counted
        apart from the MoE layers (unit kind 3)."""
        units = self.units if self.units is not None else range(spec.num_units)
        layers = [u - 1 for u in units if 1 <= u <= spec.num_layers]
        dense = sum(not spec.is_moe(j) for j in layers) if spec.num_experts else 0
        return int(0 in units), len(layers) - dense, int(spec.num_units - 1 in units), dense


@dataclass
class Prediction:
    """Predicted times of one block (gpu_batch_size x num_gpu_batches prompts)."""
    prefill_s: float                 # the prefill step (first token)
    decode_s: float                  # one decode step, averaged over the generation
    block_s: float                   # prefill + (gen_len - 1) decode steps
    blocks: int                      # blocks in the run (num_prompts / block, rounded up)
    throughput: float                # generated tokens / s over the whole run
    decode_throughput: float         # tokens / s of the decode steps alone
    peak: dict                       # peak bytes per tier ("gpu", "cpu", "disk")
    breakdown: dict = field(default_factory=dict)   # phase -> resource -> s per block
    disk_cached: bool = False        # disk reads assumed served from the page cache

    def to_dict(self) -> dict:
        return {"prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "block_s": self.block_s, "blocks": self.blocks, "throughput_tok_s": self.throughput,
                "decode_throughput_tok_s": self.decode_throughput, "peak_bytes": self.peak,
                "disk_cached": self.disk_cached}


@dataclass
class SearchResult:
    policy: Policy
    prediction: Prediction
    lp_solves: int = 0
    lp_max_s: float = 0.0
    search_s: float = 0.0
    candidates: int = 0


# ---- linear expressions -------------------------------------------------------------------
def lin_expr(const: float = 0.0, **coef: float) -> Lin:
    return {"1": const, **coef}


def add_exprs(*exprs: Lin) -> Lin:
    out: Lin = {}
    for e in exprs:
        for k, v in e.items():
            out[k] = out.get(k, 0.0) + v
    return out


def lin_value(e: Lin, x: dict) -> float:
    return sum(v * (1.0 if k == "1" else x[k]) for k, v in e.items())
