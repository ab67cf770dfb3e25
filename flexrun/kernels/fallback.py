"""A Triton kernel left for the torch ops once it failed in this process (a build failure on
some machine), said in one line: kernels/routing.py and kernels/token_quant.py."""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


class Fallback:
    """Whether a kernel is still on (`on`), and `run`, which turns it off when it raises."""

    def __init__(self, name: str):
        self.name = name
        self.errors: list[str] = []     # why it stopped being used

    @property
    def on(self) -> bool:
        return not self.errors

    def run(self, launch: Callable[[], T], x: torch.Tensor) -> T | None:
        """launch() on x's device; None once it raised (outside a CUDA graph capture, which
        cannot fall back): the kernel stays off for the process, the caller runs the torch
        ops. Running out of memory says nothing of the kernel: it is raised, the kernel kept."""
        try:
            return launch()
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                raise
            if self.on:
                print(f"flexrun: {self.name} kernel failed ({type(e).__name__}: {e}); using "
                      "torch ops", file=sys.stderr, flush=True)
            self.errors.append(str(e))
            return None
