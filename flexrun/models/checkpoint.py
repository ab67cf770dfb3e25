"""A model source as the loaders hand it over: spec, lazy tensors, tokenizer, chat template."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from flexrun.models.spec import ModelSpec

TensorIter = Iterator[tuple[str, torch.Tensor]]


@dataclass
class Checkpoint:
    """A model source: its spec, a lazy tensor iterator and (optionally) a tokenizer."""
    spec: ModelSpec
    iter_tensors: Callable[..., TensorIter]     # (device_for, names=None): names limits it
    tokenizer: object | None = None          # tokenizers.Tokenizer
    chat_template: str | None = None
    source: str = ""
    native_group: int | None = None          # 4-bit block size of a Q4 GGUF's weights
    # the tokenizer's named special tokens a chat template reads (bos_token, eos_token, ...)
    special_tokens: dict[str, str] = field(default_factory=dict)
