"""The compression flags are part of the plan: a search asked for a 4-bit cache or 4-bit
weights plans every candidate with them, since the run applies them to whatever is chosen.
(The cache-only case is the one a search free to drop the flag got wrong on S1's shape.)"""
import pytest

from flexrun.models.dummy import dummy_spec
from flexrun.plan.hardware import PROFILES_DIR, HardwareProfile
from flexrun.plan.search import search

H200 = HardwareProfile.load(PROFILES_DIR / "h200-single.json")


@pytest.mark.parametrize("weight,cache", [(False, True), (True, False), (True, True)])
def test_search_plans_with_the_compression_asked_for(weight, cache):
    # S1's shape: uncompressed, the 4-bit cache's CPU attention (2.3 GB/s on this profile)
    # would lose, so a search free to drop the flag planned without it
    res = search(dummy_spec("opt-30b"), H200, 512, 32, "16GiB", "100GiB", None, "cuda",
                 num_prompts=64, compress_weight=weight, compress_cache=cache)
    p = res.policy
    assert (p.compress_weight, p.compress_cache) == (weight, cache)
    if cache:   # priced by the 4-bit cache's attention rates: never the CPU's 2.3 GB/s path
        assert not (p.cpu_attention and p.cache_gpu < 100)
