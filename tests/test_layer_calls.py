"""The eager layer-call floor: `flexrun profile` times the engine's own decoder layers at tiny
sizes (cli/layer_calls.py), and the cost model floors each eager layer call of a GPU batch at
its kind's time (plan/unit_terms.py)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from flexrun import Policy
from flexrun.models.dummy import dummy_spec
from flexrun.plan.costmodel import predict
from flexrun.plan.hardware import HardwareProfile, layer_kind

PROFILES = Path(__file__).parents[1] / "policies" / "profiles"


def test_layer_kinds_name_every_combination():
    from flexrun.cli.layer_calls import layer_kinds
    kinds = layer_kinds()
    assert len(kinds) == 8 and kinds["moe_w4_kv4"] == ("mixtral-tiny", True, True)
    assert kinds[layer_kind(False, False, True)] == ("llama-tiny", False, True)


def test_a_layer_call_is_timed_with_the_engine_on_the_cpu():
    """It runs the engine's 4-bit MoE layers and gives a time (no bound on it: CI tests
    compare no duration with a threshold)."""
    import math
    from flexrun.cli.layer_calls import layer_call_s
    t = layer_call_s("mixtral-tiny", True, True, device="cpu", steps=4, reps=1)
    assert isinstance(t, float) and math.isfinite(t) and t > 0


def test_many_small_batches_are_floored_at_the_measured_layer_call():
    """S6q's 32 x 8 plan on the H100: 256 eager 4-bit MoE layer calls over a 4-bit cache a
    step, launch-bound at ~3.4 ms each (0.86 s a step), which the tiny unit's floor priced
    at 0.31 s. With the layer call measured the step is at least 32 x 8 calls of it, and the
    kind of the policy is the one charged."""
    spec = dummy_spec("mixtral-8x7b")
    prof = HardwareProfile.load(PROFILES / "h100-measured.json")
    pol = Policy(gpu_batch_size=32, num_gpu_batches=8, weights_gpu=37, weights_cpu=63,
                 cache_gpu=100, cache_cpu=0, compress_weight=True, compress_cache=True)

    def step(calls: dict | None, p: Policy = pol) -> float:
        return predict(spec, p, replace(prof, gpu_layer_calls=calls), 512, 256, 256,
                       "cuda", 2).decode_s
    call = 3.4e-3
    slow = step({"moe_w4_kv4": call})
    assert slow >= spec.num_layers * 8 * call
    assert step(None) < 0.5 * slow
    assert step({"moe_w4_kv4": call, "dense_w4_kv4": call, "moe": call}) == pytest.approx(slow)
    assert step({"moe": call}) == pytest.approx(step(None))     # another kind: not charged
    plain = replace(pol, compress_weight=False, compress_cache=False, weights_gpu=10,
                    weights_cpu=90)
    assert step({"moe": call}, plain) >= spec.num_layers * 8 * call
    # the touched experts' share of the compute does not undercut the floor (8 x 4 rows)
    few = Policy(gpu_batch_size=8, num_gpu_batches=4, weights_gpu=20, weights_cpu=40,
                 weights_disk=40, cache_gpu=100, cache_cpu=0)
    compute = predict(spec, few, replace(prof, gpu_layer_calls={"moe": call}), 512, 32, 32,
                      "cuda", 2).breakdown["decode"]["compute"]
    assert compute >= spec.num_layers * 4 * call


def test_profiles_without_layer_calls_borrow_a_like_hosts():
    """gpu_layer_calls is the host's launch cost: a profile of a like host lends it."""
    from flexrun.plan.hardware import fill_missing_terms
    h100 = HardwareProfile.load(PROFILES / "h100-measured.json")
    assert h100.gpu_layer_calls and h100.gpu_layer_calls["moe_w4_kv4"] > h100.gpu_unit_overhead
    h200 = fill_missing_terms(replace(HardwareProfile.load(PROFILES / "h200-single.json"),
                                      gpu_layer_calls=None), PROFILES / "h200-single.json")
    lenders = [HardwareProfile.load(p).gpu_layer_calls for p in PROFILES.glob("*.json")
               if p.name != "h200-single.json"]
    assert h200.gpu_layer_calls and h200.gpu_layer_calls in lenders
    assert "gpu_layer_calls" in h200.notes
