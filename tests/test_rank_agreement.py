"""Privacy invariant 9 on two real gloo ranks: a stale or node-local latent cache, or a rank drawing other
noise, stops the run on every rank with a one-line error; agreeing ranks pass."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from launchers.local import torchrun
from tiny import finetune_config, make_mnist_shards, make_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "agreement_worker.py"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    from dpldm.data.latent_cache import ensure_cache
    from dpldm.models.pipeline import load_pipeline
    tmp = tmp_path_factory.mktemp("agree")
    pipe, shards = make_tiny_pipeline(tmp / "pipe"), make_mnist_shards(tmp / "mnist", n=32)
    cache = ensure_cache(finetune_config(tmp, pipe, shards), load_pipeline(pipe).vae)
    stale = Path(f"{cache.path}_stale")
    shutil.copytree(cache.path, stale)
    labels = np.load(stale / "labels.npy")
    np.save(stale / "labels.npy", np.roll(labels, 1))        # same size and keys, other contents
    return cache.path


def _torchrun(cache: Path, mode: str) -> subprocess.CompletedProcess:
    return torchrun([str(WORKER), "--cache", str(cache), "--mode", mode], timeout=300)


def test_agreeing_ranks_pass(cache_dir):
    out = _torchrun(cache_dir, "ok")
    assert out.returncode == 0 and out.stdout.count("AGREED") == 2, out.stdout + out.stderr[-2000:]


def test_ranks_with_mismatched_caches_refuse(cache_dir):
    out = _torchrun(cache_dir, "cache")
    assert out.returncode != 0 and out.stdout.count("REFUSED") == 2, out.stdout + out.stderr[-2000:]
    assert "ranks disagree on cache" in out.stdout and "AGREED" not in out.stdout


def test_ranks_drawing_different_noise_refuse(cache_dir):
    out = _torchrun(cache_dir, "noise")
    assert out.returncode != 0 and out.stdout.count("REFUSED") == 2, out.stdout + out.stderr[-2000:]
    assert "ranks drew different noise" in out.stdout


def test_rank_that_finds_the_cache_already_built_still_waits_at_the_same_barrier(tmp_path):
    """Rank 1 looks at the cache only once rank 0 has encoded it: it must not skip the barrier rank 0 waits at
    (it did, and a two-node SLURM fine-tune hung in CI: rank 0 in the barrier, rank 1 in the next collective)."""
    from dpldm.config import save_config
    pipe, shards = make_tiny_pipeline(tmp_path / "pipe"), make_mnist_shards(tmp_path / "mnist", n=32)
    config = tmp_path / "finetune.yaml"
    save_config(finetune_config(tmp_path, pipe, shards), config)
    out = torchrun([str(WORKER), "--config", str(config), "--mode", "late"], timeout=180)
    assert out.returncode == 0 and out.stdout.count("AGREED") == 2, out.stdout + out.stderr[-2000:]
