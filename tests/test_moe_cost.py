"""The cost of mixture-of-experts layers: the cost model and the floor move only the touched
experts, price dense layers of a MoE model as dense, split host experts between the copy and
CPU lanes by the batches a copy serves, and charge expert-by-expert calls their routing sync."""
from __future__ import annotations

import pytest
import torch

from flexrun import Policy
from test_moe import moe_spec


def test_cost_model_moves_only_touched_experts_and_adds_the_cpu_lane():
    """Expected experts touched: k for one token, all E for many; a small decode block of a
    128-expert model moves a fraction of its experts, a large one all of them; a profile with
    a CPU expert rate makes the auto lanes faster than copies alone where a call touches few
    experts."""
    from dataclasses import replace
    from flexrun.models.dummy import dummy_spec
    from flexrun.plan.costmodel import predict
    from flexrun.plan.hardware import HardwareProfile
    from flexrun.plan.moe_cost import moe_layer
    from pathlib import Path
    spec = dummy_spec("qwen3-30b-a3b")
    m = moe_layer(spec, Policy(), 2)
    assert m.touched(1) == pytest.approx(8) and m.touched(10_000) == pytest.approx(128)
    assert m.expert_params == 3 * spec.hidden_size * spec.expert_ffn_dim
    assert 0 < m.moved_share(1) < 0.1 and m.moved_share(4096) > 0.99
    prof = HardwareProfile.load(Path(__file__).parents[1] / "policies/profiles/h200.json")
    prof = replace(prof, cpu_expert_bw=15e9)
    off = dict(weights_gpu=20, weights_cpu=80, cache_gpu=0, cache_cpu=100, cpu_attention=True)
    small = predict(spec, Policy(gpu_batch_size=1, **off), prof, 64, 8)
    large = predict(spec, Policy(gpu_batch_size=256, **off), prof, 64, 8)
    assert small.breakdown["decode"]["weights"] < 0.2 * large.breakdown["decode"]["weights"]
    # a batch of 4 rows touches ~29 of 128 experts: auto splits them over both lanes; 256
    # rows touch all: they are staged on the copy lane alone (models.moe.STAGE_ALL)
    few = {lanes: predict(spec, Policy(gpu_batch_size=4, expert_lanes=lanes, **off), prof, 64,
                          8).breakdown["decode"]["weights"] for lanes in ("copy", "auto")}
    assert few["copy"] / few["auto"] == pytest.approx((prof.h2d_pinned + 15e9) /
                                                      prof.h2d_pinned, rel=0.05)
    copy = predict(spec, Policy(gpu_batch_size=256, expert_lanes="copy", **off), prof, 64, 8)
    assert copy.breakdown["decode"]["weights"] == pytest.approx(
        large.breakdown["decode"]["weights"])


def test_cost_model_prices_dense_layers_of_a_moe_model_as_dense():
    """A MoE model whose config keeps some layers dense (mlp_only_layers, first_k_dense):
    those layers stream and multiply their own dense MLP, the MoE layers only the touched
    experts. With every weight streamed from the CPU, the decode step's copy time is each
    kind's stored bytes over the link, summed over its layers."""
    from dataclasses import replace
    from flexrun.models.dummy import dummy_spec
    from flexrun.plan.cost_types import Workload
    from flexrun.plan.costmodel import predict
    from flexrun.plan.footprint import weight_bytes
    from flexrun.plan.hardware import HardwareProfile
    from flexrun.plan.moe_cost import moe_layer
    from pathlib import Path
    base = dummy_spec("qwen3-30b-a3b")
    spec = replace(base, moe_layers=tuple(range(2, base.num_layers)))     # layers 0, 1 dense
    assert Workload(64, 8).unit_counts(spec) == (1, base.num_layers - 2, 1, 2)
    assert Workload(64, 8).unit_counts(base) == (1, base.num_layers, 1, 0)
    prof = HardwareProfile.load(Path(__file__).parents[1] / "policies/profiles/h200.json")
    pol = Policy(gpu_batch_size=4, weights_gpu=0, weights_cpu=100, expert_lanes="copy")
    nbytes = lambda u: sum(weight_bytes(n, sh, 2, pol) for n, sh in spec.unit_shapes(u).items())  # noqa: E731
    m = moe_layer(spec, pol, 2)
    moe_moved = (m.dense_bytes + m.touched(4) * m.expert_bytes) * (base.num_layers - 2)
    want = (nbytes(0) + nbytes(spec.num_units - 1) + 2 * nbytes(1) + moe_moved) / prof.h2d_pinned
    got = predict(spec, pol, prof, 64, 8).breakdown["decode"]["weights"]
    assert got == pytest.approx(want, rel=1e-6)
    assert nbytes(1) != nbytes(3) and nbytes(3) == m.dense_bytes + m.experts * m.expert_bytes


def test_floor_moves_touched_experts_over_both_lanes():
    """bench/floor.py for a MoE model: a one-prompt block moves a small share of a 128-expert
    model's experts, a large block all of them; a CPU expert rate lowers the PCIe floor."""
    from dataclasses import replace
    from pathlib import Path
    from bench.floor import decode_floor
    from flexrun.models.dummy import dummy_spec
    from flexrun.plan.hardware import HardwareProfile
    spec = dummy_spec("qwen3-30b-a3b")
    prof = HardwareProfile.load(Path(__file__).parents[1] / "policies/profiles/h200.json")
    off = dict(weights_gpu=8, weights_cpu=92, cache_gpu=0, cache_cpu=100, cpu_attention=True)
    one = decode_floor(spec, Policy(gpu_batch_size=1, **off), prof, 512, 32)
    many = decode_floor(spec, Policy(gpu_batch_size=256, **off), prof, 512, 32)
    assert one["bound"] == many["bound"] == "pcie" and one["pcie_s"] < 0.25 * many["pcie_s"]
    lane = decode_floor(spec, Policy(gpu_batch_size=256, **off), replace(prof, cpu_expert_bw=15e9),
                        512, 32)
    assert lane["pcie_s"] < many["pcie_s"]


def test_cpu_lane_split_counts_the_block_batches_a_copy_serves():
    """auto lanes: an expert copied to the device serves the block's later batches, one on the
    CPU lane is computed again in each batch that routes to it. With one batch per block the
    CPU lane takes the lightly routed experts; early in a block of 16 it takes fewer (none
    here); on the block's last batch the choice is the one-batch one again. The cost model
    prices the same: more batches per block, a smaller CPU lane."""
    from flexrun.engine.experts import LaneRates, TieredExperts
    from flexrun.models.dummy import dummy_spec
    from flexrun.models.moe import ExpertGroup
    spec = moe_spec("topk_softmax", E=8, k=2)
    te = object.__new__(TieredExperts)
    te.spec, te.lanes, te.cuda, te.dtype = spec, "auto", True, torch.float16
    te.rates = LaneRates(copy_bps=50e9, cpu_bps=20e9, cpu_flops=1e12)
    te._layer, te._sizes = 0, {(0, e): 100 << 20 for e in range(8)}
    away = [ExpertGroup(e, torch.arange(n), torch.ones(n)) for e, n in
            enumerate([1, 1, 2, 9, 12, 14, 20, 40])]
    picks = {}
    for batches, at in ((1, 0), (16, 0), (16, 15)):
        te.block_batches, te._batch = batches, at
        picks[(batches, at)] = len(te.split(away, rows=16)[0])
    assert picks[(1, 0)] > 0 and picks[(16, 0)] < picks[(1, 0)]
    assert picks[(16, 15)] == picks[(1, 0)]
    # the CPU lane alone: 8 batches of 4 rows compute each expert in ~5.5 of them, one batch
    # of 32 rows once, for the same moved bytes
    from flexrun.plan.costmodel import predict
    from flexrun.plan.hardware import PROFILES_DIR, HardwareProfile
    prof = HardwareProfile.load(PROFILES_DIR / "h200-single.json")
    assert prof.cpu_expert_bw
    mix = dummy_spec("mixtral-8x7b")
    step = {}
    for b, n in ((4, 8), (32, 1)):
        pol = Policy(gpu_batch_size=b, num_gpu_batches=n, weights_gpu=20, weights_cpu=80,
                     cache_gpu=100, cache_cpu=0, expert_lanes="cpu")
        step[n] = predict(mix, pol, prof, 512, 32, 32, "cuda", 2).decode_s
    assert step[8] > 3 * step[1], step


def test_cost_model_charges_the_routing_sync_of_expert_by_expert_calls():
    """Decode calls routed expert by expert wait for their routing counts on the host: each
    costs an eager unit's launch time on top of its GPU work, per GPU batch and MoE layer
    (scaled by the experts' share off the device); calls that stage every expert do not."""
    from dataclasses import replace
    from flexrun.models.dummy import dummy_spec
    from flexrun.plan.costmodel import predict
    from flexrun.plan.hardware import PROFILES_DIR, HardwareProfile
    spec = dummy_spec("qwen3-30b-a3b")
    prof = HardwareProfile.load(PROFILES_DIR / "h100.json")
    off = dict(weights_gpu=20, weights_cpu=80, cache_gpu=0, cache_cpu=100, cpu_attention=True)
    # 2 x 4 rows touch ~52 of 128 experts: routed expert by expert; 64 x 4 and 16 x 16 touch
    # all of them: staged (a block's staged experts serve all its batches)
    for (b, n), charged in (((2, 4), True), ((64, 4), False), ((16, 16), False)):
        pol = Policy(gpu_batch_size=b, num_gpu_batches=n, **off)
        comp = [predict(spec, pol, replace(prof, gpu_unit_overhead=o), 512, 32, b * n,
                        "cuda", 2).breakdown["decode"]["compute"] for o in (0.0, 1e-3)]
        extra = comp[1] - comp[0]
        want = spec.num_layers * n * 1e-3 * 0.8
        assert (extra >= want * 0.99) == charged, (b, n, extra, want)


def test_grouped_expert_rate_bounds_the_experts_gpu_time():
    """A decode call over staged (or resident) experts runs the grouped GEMMs, which read every
    touched expert's weights once: with the profile's gpu_expert_bw the call costs at least
    those bytes over that rate, per GPU batch; calls routed expert by expert do not use it."""
    from dataclasses import replace
    from flexrun.models.dummy import dummy_spec
    from flexrun.plan.costmodel import predict
    from flexrun.plan.hardware import PROFILES_DIR, HardwareProfile
    spec = dummy_spec("qwen3-30b-a3b")
    prof = replace(HardwareProfile.load(PROFILES_DIR / "h100.json"), gpu_expert_bw=None)
    off = dict(weights_gpu=20, weights_cpu=80, cache_gpu=0, cache_cpu=100, cpu_attention=True)
    expert_bytes = 3 * spec.hidden_size * spec.expert_ffn_dim * 2
    for (b, n), grouped in (((64, 4), True), ((128, 2), True), ((2, 4), False)):
        pol = Policy(gpu_batch_size=b, num_gpu_batches=n, **off)
        comp = [predict(spec, pol, replace(prof, gpu_expert_bw=bw), 512, 32, b * n, "cuda",
                        2).breakdown["decode"]["compute"] for bw in (None, 1e11)]
        extra = comp[1] - comp[0]
        floor = spec.num_layers * n * 100 * expert_bytes / 1e11    # >= 100 experts a call
        assert (extra >= 0.5 * floor) == grouped, (b, n, extra, floor)


def test_per_expert_route_costs_a_launch_floor_per_touched_expert():
    """A call too large for the grouped workspace (a long prefill) loops over its routed
    experts, each a tiny unit's launches: the call costs at least touched x the profile's
    unit overhead; a staged decode call (grouped GEMMs) does not."""
    from dataclasses import replace
    from flexrun.models.dummy import dummy_spec
    from flexrun.plan.costmodel import predict
    from flexrun.plan.hardware import PROFILES_DIR, HardwareProfile
    spec = dummy_spec("qwen3-30b-a3b")
    prof = HardwareProfile.load(PROFILES_DIR / "h100.json")
    pol = Policy(gpu_batch_size=64, num_gpu_batches=4, weights_gpu=20, weights_cpu=80,
                 cache_gpu=0, cache_cpu=100, cpu_attention=True)
    comp = {o: predict(spec, pol, replace(prof, gpu_unit_overhead=o), 512, 32, 256, "cuda",
                       2).breakdown for o in (1e-6, 1e-3)}
    prefill = comp[1e-3]["prefill"]["compute"]
    assert prefill >= spec.num_layers * 4 * 120 * 1e-3          # >= 120 of 128 experts a call
    decode_extra = comp[1e-3]["decode"]["compute"] - comp[1e-6]["decode"]["compute"]
    assert decode_extra < spec.num_layers * 4 * 10 * 1e-3, decode_extra


def test_each_expert_copy_costs_the_profiles_fixed_time():
    """Each host-to-GPU copy has a fixed cost when issued back to back (h2d_call_s, measured
    by `flexrun profile`): experts routed one by one cross as a few copies each (Qwen3-MoE:
    gate;up and down; Mixtral: 224 + 112 MiB in 16 MiB pieces), a layer's experts
    staged at once as runs in 16 MiB pieces; the decode's weight time grows by those copies
    x that cost, scaled by the experts' share off the device; nothing without the term."""
    from dataclasses import replace
    from flexrun.models.dummy import dummy_spec
    from flexrun.plan.costmodel import predict
    from flexrun.plan.hardware import PROFILES_DIR, HardwareProfile
    from flexrun.plan.moe_cost import moe_layer
    prof = replace(HardwareProfile.load(PROFILES_DIR / "h100.json"), h2d_call_s=None)
    off = dict(weights_gpu=20, weights_cpu=80, cache_gpu=0, cache_cpu=100, cpu_attention=True)
    assert moe_layer(dummy_spec("qwen3-30b-a3b"), Policy(), 2).expert_copies == 2  # gate;up
    assert moe_layer(dummy_spec("mixtral-8x7b"), Policy(), 2).expert_copies == 3 * 7   # 112 MiB
    spec = dummy_spec("qwen3-30b-a3b")
    expert = 3 * spec.hidden_size * spec.expert_ffn_dim * 2
    # 64 x 4 stages all 128 experts: laid out as their slots, they cross in 16 MiB pieces;
    # 2 x 4 routes ~52 experts one by one, two copies each (gate;up, down)
    for (b, n), copies in (((64, 4), 128 * expert / (16 << 20) + 2), ((2, 4), 2 * 52)):
        pol = Policy(gpu_batch_size=b, num_gpu_batches=n, **off)
        w = [predict(spec, pol, replace(prof, h2d_call_s=c), 512, 32, b * n, "cuda",
                     2).breakdown["decode"]["weights"] for c in (None, 1e-5)]
        want = spec.num_layers * copies * 1e-5 * 0.8
        assert w[1] - w[0] == pytest.approx(want, rel=0.05), (b, n)


def test_four_bit_experts_pay_their_launches_and_leave_the_cpu_lane_out():
    """4-bit experts run expert by expert where a block touches few of them: each decode
    batch of a MoE layer pays gpu_w4_expert_call_s per touched expert beyond its routing
    sync; all resident, or the block touching nearly all, they run as grouped 4-bit GEMMs
    over the resident ones and the copies held for the block (kernels/grouped4.py) and pay
    none. Auto lanes leave 4-bit
    experts to the copies (the host dequantizes them first), so auto and copy price alike.
    The floor drops the CPU lane for them too."""
    from dataclasses import replace
    from pathlib import Path
    from bench.floor import decode_floor
    from flexrun.models.dummy import dummy_spec
    from flexrun.plan.costmodel import predict
    from flexrun.plan.hardware import HardwareProfile
    from flexrun.plan.moe_cost import moe_layer
    spec = dummy_spec("mixtral-8x7b")
    prof = HardwareProfile.load(Path(__file__).parents[1] / "policies/profiles/h200.json")
    prof = replace(prof, cpu_expert_bw=50e9)
    q = dict(compress_weight=True, compress_cache=True, cache_gpu=100, cache_cpu=0)
    split = dict(gpu_batch_size=32, num_gpu_batches=2, weights_gpu=30, weights_cpu=70, **q)
    resident = dict(split, weights_gpu=100, weights_cpu=0, cuda_graphs=False)

    def compute(pol: dict, call: float) -> float:
        return predict(spec, Policy(expert_lanes="copy", **pol),
                       replace(prof, gpu_w4_expert_call_s=call), 512, 8
                       ).breakdown["decode"]["compute"]
    few = dict(split, gpu_batch_size=1)         # 2 rows a block: ~3.5 of 8 experts
    touched = moe_layer(spec, Policy(**few), 2).touched(1)
    assert compute(few, 2e-3) - compute(few, 1e-3) == pytest.approx(
        spec.num_layers * 2 * touched * 1e-3, rel=1e-6)
    for pol in (resident, split):
        assert compute(pol, 2e-3) == pytest.approx(compute(pol, 1e-3))
    w = {lanes: predict(spec, Policy(expert_lanes=lanes, **split), prof, 512, 8
                        ).breakdown["decode"]["weights"] for lanes in ("copy", "auto")}
    assert w["auto"] == pytest.approx(w["copy"])
    # fp16 experts, batches touching few of them (not all staged on the copy lane)
    plain = {k: v for k, v in split.items() if k not in ("compress_weight", "compress_cache")}
    plain["gpu_batch_size"] = 1
    fp16 = {lanes: predict(spec, Policy(expert_lanes=lanes, **plain), prof, 512, 8
                           ).breakdown["decode"]["weights"] for lanes in ("copy", "auto")}
    assert fp16["auto"] < fp16["copy"]          # fp16 experts: the CPU lane helps
    floors = [decode_floor(spec, Policy(expert_lanes="auto", **s), prof, 512, 8)["pcie_s"] /
              decode_floor(spec, Policy(expert_lanes="copy", **s), prof, 512, 8)["pcie_s"]
              for s in (split, plain)]
    assert floors[0] == pytest.approx(1.0) and floors[1] < 1.0


def test_the_four_bit_expert_call_is_timed():
    """flexrun profile's timing of one routed 4-bit expert (its launches on a GPU) runs the
    per-expert route's own code and gives a positive time."""
    from flexrun.plan.timing import w4_expert_call
    assert w4_expert_call(torch.device("cpu"), rows=4) > 0
