"""The cost model and the bench floor count a compressed KV cache as the footprint does:
4-bit codes, fp16 mins and scales, plus the exact window ring and sink tokens."""
import pytest

from bench.floor import decode_floor
from flexrun import Policy
from flexrun.models.dummy import dummy_spec
from flexrun.plan.footprint import kv_block_nbytes, kv_step_nbytes
from flexrun.plan.footprint import footprint
from flexrun.plan.hardware import HardwareProfile, profile_path

SPEC = dummy_spec("opt-125m")
P, GEN = 128, 32


def _policy(**kw) -> Policy:
    return Policy(gpu_batch_size=4, num_gpu_batches=2, compress_cache=True, **kw)


def _cpu_profile() -> HardwareProfile:
    return HardwareProfile.load(profile_path("cpu"))


@pytest.mark.parametrize("scheme,window,sink", [("kivi", 0, 0), ("kivi", 32, 4),
                                                ("kivi", 128, 16), ("per_token", 32, 4)])
def test_cost_model_kv_bytes_are_the_footprint(scheme, window, sink):
    pol = _policy(cache_scheme=scheme, cache_window=window, cache_sink=sink)
    fp = footprint(SPEC, pol, 4, P, GEN)
    assert kv_block_nbytes(SPEC, pol, 4, P + GEN) * SPEC.num_layers == sum(fp.cache.values())


def test_window_and_sinks_add_exact_positions():
    base = _policy(cache_window=0, cache_sink=0)
    wide = _policy(cache_window=64, cache_sink=4)
    exact = 2 * base.block_size * (64 + 4) * SPEC.kv_dim * 4        # fp32 K and V
    for t in (0, P, P + GEN / 2):
        assert kv_block_nbytes(SPEC, wide, 4, t) - kv_block_nbytes(SPEC, base, 4, t) == exact
    # a step stores a position's codes and, into the ring, its exact K and V
    dense = Policy(gpu_batch_size=4, num_gpu_batches=2)
    step = kv_step_nbytes(SPEC, wide, 4, P + GEN)
    assert kv_step_nbytes(SPEC, dense, 4, P + GEN) < step < 1.2 * kv_step_nbytes(SPEC, dense, 4,
                                                                                   P + GEN)
    # the old per-value estimate (4 bits + 4 bytes per group) ignored the exact positions
    per_value = 2 * base.block_size * P * SPEC.kv_dim * (0.5 + 4 / 64)
    assert kv_block_nbytes(SPEC, wide, 4, P) > 1.5 * per_value


def test_floor_counts_the_window():
    prof = _cpu_profile()
    read = prof.cpu_read_bw or prof.cpu_mem_bw
    small, wide = _policy(cache_window=0, cache_sink=0), _policy(cache_window=128, cache_sink=4)
    a = decode_floor(SPEC, small, prof, P, GEN, cuda=False)
    b = decode_floor(SPEC, wide, prof, P, GEN, cuda=False)
    extra = SPEC.num_layers * (kv_block_nbytes(SPEC, wide, 4, P + GEN / 2)
                               - kv_block_nbytes(SPEC, small, 4, P + GEN / 2))
    assert extra > 0
    assert b["host_dram_s"] - a["host_dram_s"] == pytest.approx(extra / read)


def test_cost_model_charges_the_window():
    """Cache on disk: the decode step reads the exact window and sinks too."""
    from flexrun.plan.costmodel import predict
    prof = _cpu_profile()
    on_disk = dict(cache_gpu=0, cache_disk=100)
    small = predict(SPEC, _policy(cache_window=0, cache_sink=0, **on_disk), prof, P, GEN,
                    device="cpu", disk_cached=False)
    wide = predict(SPEC, _policy(cache_window=128, cache_sink=4, **on_disk), prof, P, GEN,
                   device="cpu", disk_cached=False)
    assert wide.decode_s > small.decode_s
