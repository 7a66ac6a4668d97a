"""Local multi-process launch: `torchrun` on this machine, for tests and benchmarks.

    proc = torchrun(["tests/agreement_worker.py", "--mode", "ok"], nproc=2)   # CompletedProcess, output captured

A free port, one thread per rank, and no rendezvous variables inherited from the calling process (a
leftover RANK/WORLD_SIZE would make the workers wait for the wrong group).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, timeout: float | None = 400) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node NPROC ARGS` from the repository root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(free_port()), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
