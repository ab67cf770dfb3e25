"""flexrun: throughput-oriented LLM inference with GPU / CPU / disk offloading."""
from .api import LLM, RequestOutput
from .config import FlexrunError, Policy, SamplingParams

__all__ = ["LLM", "Policy", "SamplingParams", "RequestOutput", "FlexrunError"]
__version__ = "0.1.0"
