"""Shared fixtures. slurm_cluster: a real two-node SLURM cluster (tests/slurm_cluster.py), started once
per session for tests marked `slurm`; it fails loudly (never skips) where root or netns are missing."""
from __future__ import annotations

import pytest


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
