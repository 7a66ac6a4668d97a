"""Shared fixtures. slurm_cluster: a real two-node SLURM cluster (tests/slurm_cluster.py), started once
per session for tests marked `slurm`; it fails loudly (never skips) where root or netns are missing."""
from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def restore_environ():
    """Rank discovery exports RANK/WORLD_SIZE/MASTER_* into os.environ (as srun tasks need); a test that
    exercises it must not leave them behind, or a later single-process run would wait for a rendezvous."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch thread per test process: on the 2-core dev/CI machine, tests that start worker
    subprocesses (torchrun, SLURM jobs, DataLoader workers) would otherwise oversubscribe the cores, and
    OpenMP spin-waiting under oversubscription makes small models ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def slurm_cluster():
    from slurm_cluster import ClusterError, SlurmCluster
    cluster = SlurmCluster()
    try:
        cluster.start()
    except ClusterError as e:
        cluster.stop()
        pytest.fail(f"cannot start the two-node SLURM test cluster: {e}", pytrace=False)
    yield cluster
    cluster.stop()
