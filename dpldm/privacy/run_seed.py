"""The private run's seed: drawn once from the OS CSPRNG, kept in `RUN/private/seed.json`, never published.

    seed, source = run_seed(cfg.seed, run_dir, env)   # same value on every rank; source "secret" | "explicit"

Every random stream of the run (Poisson batches, DP noise, per-example draws) derives from this seed
(dpldm/rng.py). Whoever holds it regenerates the noise of every step and subtracts it, so the file
lives in the run's private state (`RUN/private/`, mode 0700/0600, next to `checkpoints/`) and is never
written to config.yaml, the ledger, logs, reports, exports or samples (docs/privacy.md, release
checklist). Re-running the same command reuses it, so a resumed run continues the same streams; a new
run directory gets a new seed, so two runs never share their noise. An explicit `seed=N` is kept too, and
the ledger marks such a run as not a release.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from dpldm.distributed.agreement import broadcast_from_main
from dpldm.errors import DpldmError
from dpldm.rng import secret_seed
from dpldm.run_dir import RunDir

SEED_FILE = "seed.json"


def seed_path(run_dir: str | Path) -> Path:
    return RunDir(run_dir).private / SEED_FILE


def _read(path: Path) -> tuple[int, str]:
    try:
        data = json.loads(path.read_text())
        seed, source = int(data["seed"], 16), data["source"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DpldmError(f"run seed: {path} is unreadable or malformed ({e}); it must hold "
                         '{"seed": "<hex>", "source": "secret"|"explicit"}') from None
    if source not in ("secret", "explicit"):
        raise DpldmError(f"run seed: {path} has source {source!r}; expected secret or explicit")
    return seed, source


def _write(path: Path, seed: int, source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"seed": f"{seed:x}", "source": source}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_or_create(config_seed: int | None, run_dir: Path) -> tuple[int, str]:
    path = seed_path(run_dir)
    if path.exists():
        seed, source = _read(path)
        if config_seed is not None and (source != "explicit" or config_seed != seed):
            raise DpldmError(f"run seed: seed={config_seed} differs from the seed this run was started with "
                             f"({path}); resume without changing it, or start a new run directory")
        return seed, source
    if config_seed is not None and (isinstance(config_seed, bool) or config_seed < 0):
        raise DpldmError(f"config: seed must be a non-negative integer or null (secret); got {config_seed!r}")
    seed, source = (secret_seed(), "secret") if config_seed is None else (int(config_seed), "explicit")
    _write(path, seed, source)
    return seed, source


def run_seed(config_seed: int | None, run_dir: str | Path, env) -> tuple[int, str]:
    """(seed, source) on every rank: rank 0 reads RUN/private/seed.json, or creates it (a fresh secret seed when
    `config_seed` is None), and broadcasts it, so ranks need not share a file system. Errors stop every rank."""
    result: tuple | str = ""
    if env.is_main:
        try:
            result = _read_or_create(config_seed, Path(run_dir))
        except DpldmError as e:
            result = str(e)
    result = broadcast_from_main(result)
    if isinstance(result, str):
        raise DpldmError(result)
    return int(result[0]), str(result[1])
