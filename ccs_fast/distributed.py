"""The torchrun environment, read in one place.

``torchrun`` starts one process per GPU and tells each its place through ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``; a plain ``python`` run has none of
them and is rank 0 of 1. The trainer, both loader backends and the worker-count defaults
read the environment only through ``dist_env()``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env() -> DistEnv:
    """This process's place among torchrun's processes; a single process when the variables
    are absent."""
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )


def cores_per_process() -> int:
    """This machine's cores shared among the processes torchrun started on it."""
    return max(1, (os.cpu_count() or 1) // dist_env().local_world_size)
