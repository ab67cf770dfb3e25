"""The load's device peak (plan/footprint.py load_transient): 4-bit weights are quantized on
the GPU whatever their tier, so the GPU must hold the weights placed there plus the largest
weight's quantization at once; the planner counts it and the search keeps within it."""
from __future__ import annotations

import dataclasses

from flexrun import Policy
from flexrun.memory.wquant import LOAD_CHUNK
from flexrun.models.dummy import dummy_spec
from flexrun.plan.footprint import footprint, numel
from flexrun.plan.hardware import PROFILES_DIR, HardwareProfile
from flexrun.plan.search import search

H100 = HardwareProfile.load(PROFILES_DIR / "h100.json")
GiB = 1 << 30


def test_load_counts_the_largest_weights_quantization():
    spec = dummy_spec("opt-175b")
    pol = Policy(gpu_batch_size=4, num_gpu_batches=1, weights_gpu=100, weights_cpu=0,
                 cache_gpu=100, cache_cpu=0, compress_weight=True)
    fp = footprint(spec, pol, 2, None, None, cuda=True)
    fc1 = 12288 * 49152                             # its largest weight, 604M values
    assert numel((49152, 12288)) == fc1
    assert fp.load >= 2 * fc1 + 16 * LOAD_CHUNK     # fp16 whole + one block's temporaries
    assert fp.load < 2 * fc1 + 16 * LOAD_CHUNK + 2 * fc1   # not the unchunked 15 bytes/value
    assert fp.total("gpu") >= fp.weights["gpu"] + fp.load
    assert footprint(spec, pol, 2, None, None, cuda=False).load == 0
    plain = dataclasses.replace(pol, compress_weight=False)
    assert footprint(spec, plain, 2, None, None, cuda=True).load == 0


def test_search_leaves_room_for_the_load():
    """A GPU budget the 4-bit weights and the run fit but the load does not: the search puts
    fewer of them on the GPU than the run alone would allow."""
    spec = dummy_spec("opt-6.7b")
    all_gpu = Policy(gpu_batch_size=1, num_gpu_batches=1, weights_gpu=100, weights_cpu=0,
                     cache_gpu=100, cache_cpu=0, compress_weight=True)
    fp = footprint(spec, all_gpu, 2, 16, 4, cuda=True)
    run = fp.weights["gpu"] + fp.cache["gpu"] + fp.buffers
    assert fp.weights["gpu"] + fp.load > run        # the load is the peak here
    cap = (fp.weights["gpu"] + fp.load + run) / 2 + (H100.gpu_context or 0)
    res = search(spec, H100, 16, 4, cap, 64 * GiB, None, "cuda", num_prompts=1,
                 compress_weight=True)
    assert res.policy.weights_gpu < 100
    assert res.prediction.peak["gpu"] <= cap
    got = footprint(spec, res.policy, 2, 16, 4, cuda=True)
    assert got.weights["gpu"] + got.load + (H100.gpu_context or 0) <= cap
