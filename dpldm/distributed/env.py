"""Rank discovery (torchrun or SLURM), the process group, and the two collectives the trainer needs.

    env = init_distributed(cfg.distributed.backend)   # works under torchrun, srun, or plain python
    all_reduce_sum_(grad_sum); barrier()

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under `srun` (one task per GPU, or per
node on CPU) we read SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, take the first host of SLURM_JOB_NODELIST as
the master address and derive MASTER_PORT from the job id, then export the torchrun names so DeepSpeed and
torch.distributed's env:// rendezvous see the same values.
"""
from __future__ import annotations

import atexit
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dpldm.errors import DpldmError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single"          # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list: 'gpu[01-03,7],login1' -> ['gpu01','gpu02','gpu03','gpu7','login1']."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        hosts.extend(_expand_item(item))
    if not hosts:
        raise DpldmError(f"SLURM_JOB_NODELIST={nodelist!r}: expected a host list like 'node[1-2]'")
    return hosts


def _expand_item(item: str) -> list[str]:
    m = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", item)
    if not m:
        return [item] if item else []
    prefix, ranges, rest = m.groups()
    out = []
    for part in ranges.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()):
                raise DpldmError(f"SLURM_JOB_NODELIST: bad range '{part}' in '{item}'")
            out.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
        else:
            out.append(prefix + part)
    return [h + tail for h in out for tail in _expand_item(rest)] if rest else out


def _slurm_port(job_id: str) -> int:
    """A job-specific port in 20000-29999, so two jobs sharing a node don't collide."""
    return 20000 + int(job_id) % 10000 if job_id.isdigit() else 29500


def discover_env() -> DistEnv:
    """Rank/world size from torchrun's env, else SLURM's (exporting MASTER_ADDR/PORT), else one process."""
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return DistEnv(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)), "torchrun")
    step = e.get("SLURM_STEP_ID", "")
    if "SLURM_PROCID" in e and "SLURM_NTASKS" in e and step.isdigit() and int(step) < 0xFFFFFFF0:
        # an srun task; the batch script itself has PROCID 0 too, but no step id or the batch step's
        # reserved one (0xFFFFFFFx)
        rank, world = int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"])
        local = int(e.get("SLURM_LOCALID", 0))
        if world > 1:
            if "MASTER_ADDR" not in e:
                nodelist = e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST", "")
                if not nodelist:
                    raise DpldmError("SLURM: SLURM_JOB_NODELIST is unset; cannot find the master node")
                e["MASTER_ADDR"] = expand_nodelist(nodelist)[0]
            e.setdefault("MASTER_PORT", str(_slurm_port(e.get("SLURM_JOB_ID", ""))))
        e.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        e.setdefault("LOCAL_WORLD_SIZE", e.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
        return DistEnv(rank, world, local, "slurm")
    return DistEnv()


def init_distributed(backend: str = "auto") -> DistEnv:
    """Discover the env, pin the CUDA device to the local rank, and start the process group if world > 1."""
    env = discover_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if env.world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl" and not torch.cuda.is_available():
            raise DpldmError("distributed.backend=nccl needs CUDA; use gloo (or auto) on CPU")
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise DpldmError(f"{key} is unset: launch with torchrun or srun, or export it")
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size)
        atexit.register(_shutdown)
    return env


def _shutdown() -> None:
    """At exit: the process group is destroyed explicitly (as torchtitan does at the end of training), not left
    to destructors that race the other ranks' exit; seen once as a SIGABRT of rank 0 after both ranks had
    finished the rank-agreement test. Best effort: a rank that already failed must not fail again here."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:   # noqa: BLE001 - at exit there is nothing better to do
            pass


def all_reduce_sum_(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each tensor over all ranks in place (no-op on one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors.values():
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():   # one collective per dtype, not one per tensor
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
    return tensors


def world_size() -> int:
    """Ranks in the initialised process group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
