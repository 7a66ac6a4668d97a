"""One way to tell the user something: `log(msg)` prints one line on rank 0 only (every rank with
`all_ranks=True`), flushed, to stdout (stderr with `err=True`). Progress lines, notices and warnings of every
verb go through it; results a verb is asked for (a table, a path) may print directly."""
from __future__ import annotations

import os
import sys


def rank() -> int:
    """This process's rank: torch.distributed's once initialised, else torchrun's/SLURM's RANK, else 0."""
    dist = sys.modules.get("torch.distributed")        # never import torch just to log
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def log(msg: str, *, all_ranks: bool = False, err: bool = False) -> None:
    """Print `msg` on rank 0 (or on every rank with all_ranks=True)."""
    if all_ranks or rank() == 0:
        print(msg, file=sys.stderr if err else sys.stdout, flush=True)
