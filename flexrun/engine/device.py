"""A run's compute device and dtype when they are not given."""
from __future__ import annotations

import torch

from flexrun.config import FlexrunError

BF16_FAMILIES = ("gemma2", "gemma3", "gpt_oss")  # fp16 overflows on real checkpoints (gpt-oss:
#                                                   trained and shipped in bf16 with MXFP4)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype, device: torch.device, family: str = "") -> torch.dtype:
    """The run's dtype: fp16 on a GPU (bf16 for BF16_FAMILIES), fp32 on a CPU, unless given."""
    if dtype is None:
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if family in BF16_FAMILIES else torch.float16
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise FlexrunError(f"unknown dtype {dtype!r}: use fp16, bf16 or fp32")
    return table[dtype]
