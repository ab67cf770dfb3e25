"""The execution paths bench/accuracy.py runs: Policy overrides on top of its block shape."""
from __future__ import annotations

from dataclasses import dataclass

SPLIT = dict(weights_gpu=30, weights_cpu=40, weights_disk=30, cache_gpu=30, cache_cpu=40,
             cache_disk=30, act_gpu=30, act_cpu=40, act_disk=30)


@dataclass(frozen=True)
class Variant:
    """One execution path: Policy overrides on top of BLOCK.

    host_noop: with --device cpu the compute device *is* host memory ("gpu" = "cpu" tier), so
    this path runs exactly the resident code and is skipped unless --all-paths."""
    name: str
    overrides: dict
    host_noop: bool = False


VARIANTS = [
    Variant("weights on cpu", dict(weights_gpu=0, weights_cpu=100), host_noop=True),
    Variant("weights on disk", dict(weights_gpu=0, weights_disk=100)),
    Variant("KV cache on cpu", dict(cache_gpu=0, cache_cpu=100), host_noop=True),
    Variant("KV cache on cpu + cpu attention", dict(cache_gpu=0, cache_cpu=100,
                                                    cpu_attention=True), host_noop=True),
    Variant("KV cache on disk", dict(cache_gpu=0, cache_disk=100)),
    Variant("activations on cpu", dict(act_gpu=0, act_cpu=100), host_noop=True),
    Variant("activations on disk", dict(act_gpu=0, act_disk=100)),
    Variant("weights+KV+act 30/40/30 gpu/cpu/disk", SPLIT),
    Variant("compress weight, rtn (FlexGen)", dict(compress_weight=True, weight_scheme="rtn")),
    Variant("compress weight, hqq", dict(compress_weight=True, weight_scheme="hqq")),
    Variant("compress weight, synth (default)", dict(compress_weight=True,
                                                     weight_scheme="synth")),
    # groups of 32 along the input dim = the GGUF's Q4_1 blocks (same min/scale scheme)
    Variant("compress weight, g32", dict(compress_weight=True, quant_group=32)),
    # the cache in groups of 64 (the earlier default), then of 32 (the default)
    Variant("compress cache, per_token (FlexGen), window 0",
            dict(compress_cache=True, cache_scheme="per_token", cache_group=64, cache_window=0,
                 cache_sink=0)),
    Variant("compress cache, per_token, window 64",
            dict(compress_cache=True, cache_scheme="per_token", cache_group=64,
                 cache_window=64)),
    Variant("compress cache, kivi, window 0, no sink",
            dict(compress_cache=True, cache_group=64, cache_window=0, cache_sink=0)),
    Variant("compress cache, kivi, window 0",
            dict(compress_cache=True, cache_group=64, cache_window=0)),
    Variant("compress cache, kivi, window 32",
            dict(compress_cache=True, cache_group=64, cache_window=32)),
    Variant("compress cache, kivi, window 64",
            dict(compress_cache=True, cache_group=64, cache_window=64)),
    Variant("compress cache, kivi, window 128",
            dict(compress_cache=True, cache_group=64, cache_window=128)),
    Variant("compress cache, kivi g32, window 0",
            dict(compress_cache=True, cache_group=32, cache_window=0)),
    Variant("compress cache, kivi g32, window 32 (default)", dict(compress_cache=True)),
    # how far greedy agreement moves under a far smaller error: 8-bit codes
    Variant("compress cache, kivi 8-bit, window 0, no sink",
            dict(compress_cache=True, quant_bits=8, cache_group=64, cache_window=0,
                 cache_sink=0)),
    Variant("compress weight + cache, FlexGen (rtn + per_token, window 0)",
            dict(compress_weight=True, weight_scheme="rtn", compress_cache=True,
                 cache_scheme="per_token", cache_group=64, cache_window=0, cache_sink=0)),
    Variant("compress weight + cache (defaults)", dict(compress_weight=True,
                                                       compress_cache=True)),
]
