"""Rank discovery and the process group. (Minimal version: torchrun variables; SLURM discovery is added
by the distributed work.)"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def discover_env() -> DistEnv:
    """Read rank/world size from torchrun's environment; single process otherwise."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    return DistEnv()


def init_distributed(backend: str = "auto") -> DistEnv:
    env = discover_env()
    if env.world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)
    return env


def all_reduce_sum_(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each tensor over all ranks in place (no-op on one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors.values():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return tensors


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
