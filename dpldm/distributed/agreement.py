"""Ranks agree or the run stops (privacy invariant 9): same seed, same private set, same noise.

    seed = broadcast_from_main(seed)                        # rank 0's run seed on every rank
    check_ranks_agree("finetune start", {"N": n, "cache": cache_fingerprint(cache), "sampler": ...})
    check_same_value("noise of step 12", noise.checksum)   # every step, cheap

A rank with a node-local or stale latent cache would put one example on two ranks (sensitivity 2C); a
rank that draws different noise (another GPU type, another seed) breaks "noise once, globally", and
DeepSpeed's averaging would shrink it by up to √W. Both end the run with a one-line DpldmError on
every rank, before the step's update is applied (the ledger on disk stays as the last checkpoint left it).
All checks are no-ops on one process.
"""
from __future__ import annotations

import hashlib
import json
import math

import torch
import torch.distributed as dist

from dpldm.errors import DpldmError

NOISE_RTOL = 1e-9   # the same draws summed on two GPUs of one type agree far below this


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_from_main(value):
    """Rank 0's `value` (any picklable object) on every rank."""
    if _world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cache_fingerprint(cache) -> str:
    """A hash of the latent cache's identity: its meta (source, encoder, n, shape), keys and labels."""
    h = hashlib.sha256(json.dumps(cache.meta, sort_keys=True, default=str).encode())
    keys = cache.path / "keys.json"
    if keys.exists():
        h.update(keys.read_bytes())
    h.update(cache.labels.tobytes())
    h.update(json.dumps(cache.texts).encode())
    return h.hexdigest()[:16]


def check_ranks_agree(what: str, values: dict) -> None:
    """DpldmError on every rank naming the fields where any rank differs from rank 0."""
    if _world() == 1:
        return
    gathered: list = [None] * _world()
    dist.all_gather_object(gathered, {k: json.dumps(v, sort_keys=True, default=str) for k, v in values.items()})
    diffs = sorted({k for other in gathered[1:] for k in gathered[0] if other.get(k) != gathered[0][k]})
    if diffs:   # which ranks, not the values: a cache fingerprint hashes private labels, a seed digest the seed
        detail = "; ".join(f"{k}: ranks {[r for r, g in enumerate(gathered) if g.get(k) != gathered[0][k]]} "
                           "differ from rank 0" for k in diffs)
        raise DpldmError(f"{what}: ranks disagree on {', '.join(diffs)} ({detail}); every rank must read the "
                         "same private latent cache and run seed: stopping before the next step")


def check_same_value(what: str, value: float) -> None:
    """DpldmError on every rank if `value` (e.g. a noise checksum) differs between ranks beyond NOISE_RTOL."""
    if _world() == 1:
        return
    t = torch.tensor([value, -value], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    hi, lo = float(t[0]), -float(t[1])
    if not (math.isfinite(hi) and math.isfinite(lo)) or hi - lo > NOISE_RTOL * max(1.0, abs(hi), abs(lo)):
        raise DpldmError(f"{what}: ranks drew different noise (checksums from {lo!r} to {hi!r}); noise must be "
                         "added once, identically on every rank: mixed GPU types or seeds? stopping")
