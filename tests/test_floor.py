"""bench/floor.py: the decode-step floor of a placement names its binding link, the share of
the floor a run reached, and the MoE floor counts routed experts."""
from __future__ import annotations

import dataclasses

import pytest

from flexrun import Policy
from flexrun.plan.footprint import numel
from flexrun.plan.hardware import PROFILES_DIR, HardwareProfile
from flexrun.models.dummy import dummy_spec

H100 = HardwareProfile.load(PROFILES_DIR / "h100.json")


def test_decode_floor_names_the_binding_link():
    """bench.floor: S1's searched placement is bound by host DRAM (weights by DMA + KV read by
    CPU attention, together at most the copy's rate plus the attention's rate beside it; a
    profile without that pair reads both at its memcpy rate), an all-GPU one by HBM, weights
    on disk by the disk."""
    from bench.floor import decode_floor
    spec = dummy_spec("opt-30b")
    weights = sum(numel(s) for s in spec.all_shapes().values()) * 2
    s1 = Policy(gpu_batch_size=64, weights_gpu=0, weights_cpu=100, cache_gpu=20, cache_cpu=80,
                cpu_attention=True)
    f = decode_floor(spec, s1, H100, 512, 32)
    kv = 2 * spec.num_layers * 64 * 528 * spec.kv_dim * 2
    assert f["pcie_s"] == pytest.approx(weights / H100.h2d_pinned)
    both = H100.h2d_pinned + H100.cpu_attn_bw_with_h2d
    assert f["host_dram_s"] == pytest.approx(max(0.8 * kv / H100.cpu_attn_bw,
                                                 (weights + 0.8 * kv) / both))
    assert f["bound"] == "host_dram" and f["floor_s"] == f["host_dram_s"]
    plain = decode_floor(spec, s1, dataclasses.replace(H100, cpu_attn_bw_with_h2d=None), 512, 32)
    assert plain["host_dram_s"] == pytest.approx((weights + 0.8 * kv) / H100.cpu_mem_bw)
    alone = decode_floor(spec, s1, dataclasses.replace(H100, cpu_attn_bw=H100.cpu_attn_bw / 100),
                         512, 32)
    assert alone["host_dram_s"] == pytest.approx(0.8 * kv / (H100.cpu_attn_bw / 100))
    gpu = decode_floor(dummy_spec("opt-6.7b"), Policy(gpu_batch_size=32), H100, 512, 32)
    assert gpu["bound"] == "hbm" and gpu["pcie_s"] == 0
    big = dummy_spec("opt-175b")            # 350 GB: more than the page cache can hold
    disk = decode_floor(big, Policy(gpu_batch_size=8, weights_gpu=0, weights_disk=100,
                                    cache_gpu=100), H100, 512, 32)
    big_weights = sum(numel(s) for s in big.all_shapes().values()) * 2
    assert disk["bound"] == "disk"
    assert disk["disk_s"] == pytest.approx(big_weights / H100.disk_read)
    cached = decode_floor(spec, Policy(gpu_batch_size=8, weights_gpu=0, weights_disk=100,
                                       cache_gpu=100), H100, 512, 32)
    assert cached["disk_s"] == pytest.approx(weights / H100.disk_read_cached)


def test_bench_floor_share_of_tok_s():
    """bench.floor's prefill floor counts OPT-6.7B's prefill matmuls (S3: ~0.28 s at the H100
    profile's 760 TFLOP/s) and the share compares the run's tok/s with the floors'."""
    from bench.floor import floor_of_result, prefill_floor
    from flexrun.plan.hardware import default_profile
    from flexrun.models.dummy import dummy_spec
    spec, prof = dummy_spec("opt-6.7b"), default_profile("cuda")
    pre = prefill_floor(spec, 32, 512, prof)
    assert 0.27 < pre < 0.29, pre
    assert prefill_floor(spec, 64, 512, prof) > 1.99 * pre
    r = {"model": "dummy:opt-6.7b", "device": "NVIDIA H100", "dtype": "float16",
         "policy": {"gpu_batch_size": 32}, "prompt_len": 512, "gen_len": 32,
         "num_prompts": 32, "total_tok_s": 1000.0, "decode_step_s": 0.01}
    f = floor_of_result(r)
    best = 32 * 32 / (f["prefill_floor_s"] + 31 * f["floor_s"])
    assert abs(f["floor_total_tok_s"] - best) < 1e-6 and f["share_of_floor_tok_s"] == 1000 / best
    assert 0.4 < f["share_of_floor_tok_s"] < 0.6


def test_bench_floor_moe_counts_routed_experts_and_names_profile():
    """A MoE prefill multiplies each token by its top-k experts only (Qwen3-30B-A3B: 8 of 128,
    about 3.3B of 30.5B parameters), and a result's floor uses the profile the run names."""
    from bench.floor import floor_of_result, prefill_floor
    spec = dummy_spec("qwen3-30b-a3b")
    prof = HardwareProfile.load(PROFILES_DIR / "h100.json")
    dense = dataclasses.replace(spec, experts_per_token=spec.num_experts)
    pre, all_experts = prefill_floor(spec, 8, 512, prof), prefill_floor(dense, 8, 512, prof)
    assert 6 < all_experts / pre < 12, (pre, all_experts)
    r = {"model": "dummy:qwen3-30b-a3b", "device": "NVIDIA H100 80GB HBM3", "dtype": "float16",
         "policy": {"gpu_batch_size": 64, "num_gpu_batches": 4, "weights_gpu": 17,
                    "weights_cpu": 83, "cache_gpu": 0, "cache_cpu": 100, "cpu_attention": True},
         "prompt_len": 512, "gen_len": 32, "num_prompts": 256, "total_tok_s": 80.0,
         "decode_step_s": 2.9}
    floors = {}
    for name in ("h100.json", "h100-measured.json"):
        f = floor_of_result({**r, "profile": f"policies/profiles/{name}"})
        assert f["profile"] == f"policies/profiles/{name}"
        floors[name] = f["floor_s"]
    assert floors["h100.json"] != floors["h100-measured.json"]
