"""Poisson sampling of the private set: the batch sampling the accountant assumes.

    sampler = PoissonSampler(n=len(cache), sample_rate=256 / len(cache), seed=run_seed)
    idx = sampler.next_indices()                   # one logical step, same on every rank
    mine = split_for_rank(idx, rank, world_size)   # this rank's share of the per-example work

Every example joins each logical step independently with probability q (N Bernoulli draws per
step), so batch sizes vary (Binomial(N, q)) and may be 0. The sampler is global and counter-based:
step s's draws come from the run seed's ("poisson", s) stream (dpldm/rng.py), so every rank with
the same seed draws the same indices, and a resumed run draws exactly the batches it would have
drawn from nothing but the step count. The seed is the run's secret (docs/privacy.md): whoever
knows it knows every batch, which removes the amplification by subsampling the accountant counts
on. `secure=True` draws the Bernoulli uniforms from a SHAKE-256 keystream instead of PCG64.
"""
from __future__ import annotations

import numpy as np

from dpldm.errors import DpldmError
from dpldm.rng import RunRandomness


class PoissonSampler:
    """Draws sorted global int64 indices; each example included with probability `sample_rate`."""

    def __init__(self, n: int, sample_rate: float, seed: int, secure: bool = False):
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise DpldmError(f"PoissonSampler: n (dataset size) must be an integer >= 1; got {n!r}")
        if not (0.0 < sample_rate <= 1.0):
            raise DpldmError(f"PoissonSampler: sample_rate must be in (0, 1]; got {sample_rate!r}")
        self.n = int(n)
        self.sample_rate = float(sample_rate)
        self.secure = bool(secure)
        self.steps_taken = 0
        self._rng = RunRandomness(seed)

    @property
    def expected_batch_size(self) -> float:
        return self.n * self.sample_rate

    def next_indices(self) -> np.ndarray:
        """Indices of the next logical step (sorted, int64, possibly empty)."""
        step = self.steps_taken
        if self.secure:
            uniforms = self._rng.secure_uniform("poisson", step, numel=self.n)
        else:
            uniforms = self._rng.numpy("poisson", step).random(self.n)
        self.steps_taken += 1
        return np.flatnonzero(uniforms < self.sample_rate).astype(np.int64)

    def state_dict(self) -> dict:
        """JSON-serialisable; holds no seed (the seed stays in the run's private state)."""
        return {"n": self.n, "sample_rate": self.sample_rate, "steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; refuses a state drawn for another dataset size or sample rate."""
        try:
            n, q, steps = int(state["n"]), float(state["sample_rate"]), int(state["steps_taken"])
        except (KeyError, TypeError, ValueError) as e:
            raise DpldmError(f"PoissonSampler: malformed sampler state (missing or bad {e})") from None
        if n != self.n or q != self.sample_rate:
            raise DpldmError(f"PoissonSampler: saved state is for n={n}, sample_rate={q}; this run has "
                             f"n={self.n}, sample_rate={self.sample_rate} (the accountant's q would be wrong)")
        if steps < 0:
            raise DpldmError(f"PoissonSampler: malformed sampler state (steps_taken={steps} < 0)")
        self.steps_taken = steps


def split_for_rank(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's contiguous share of one step's indices (sizes differ by at most one)."""
    if world_size < 1 or not (0 <= rank < world_size):
        raise DpldmError(f"split_for_rank: need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
    n = len(indices)
    start, stop = rank * n // world_size, (rank + 1) * n // world_size
    return indices[start:stop]
