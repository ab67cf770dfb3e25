"""The zig-zag block schedule as a plain generator of tasks.

For each generation step, for each unit (embedding, decoder layers, head), for each GPU
batch of the block: one task. A unit's weights are loaded once per step and shared by all
batches of the block (the zig-zag order of FlexGen, Sheng et al. 2023, Alg. 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Task:
    step: int           # 0 = prefill, then one per generated token
    unit: int           # 0 = embedding, 1..L = layers, L+1 = head
    batch: int          # GPU batch within the block
    first_batch: bool   # the unit's weights must be ready before this task
    last_batch: bool    # the unit's weights can be dropped after this task

    @property
    def prefill(self) -> bool:
        return self.step == 0


def zigzag(gen_len: int, num_units: int, num_batches: int) -> Iterator[Task]:
    """Tasks in execution order: step-major, then unit, then batch."""
    for step in range(gen_len):
        for unit in range(num_units):
            for batch in range(num_batches):
                yield Task(step, unit, batch, batch == 0, batch == num_batches - 1)


def next_unit(task: Task, gen_len: int, num_units: int) -> int | None:
    """The unit whose weights to prefetch once `task`'s unit is in use (None at the end)."""
    if task.unit + 1 < num_units:
        return task.unit + 1
    return 0 if task.step + 1 < gen_len else None
