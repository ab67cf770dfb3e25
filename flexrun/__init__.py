"""flexrun: throughput-oriented LLM inference with GPU / CPU / disk offloading."""
import os

# Policies fill the GPU budget with KV slots, weights and prefill temporaries of many sizes;
# with fixed segments the caching allocator fragmented (S3b on the H100: 13.8 GiB reserved
# but unusable, out of memory at 64 GiB allocated). Read when CUDA first allocates; a value
# the user set wins.
ALLOC_CONF_SET_BY_FLEXRUN = "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
from flexrun.api import LLM, RequestOutput, Sample
from flexrun.config import FlexrunError, Policy, SamplingParams
from flexrun.engine.requests import TokenLogprob

__all__ = ["LLM", "Policy", "SamplingParams", "RequestOutput", "Sample", "TokenLogprob",
           "FlexrunError"]
__version__ = "0.1.0"
