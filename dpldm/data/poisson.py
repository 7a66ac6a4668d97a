"""Poisson sampling of the private set: the batch sampling the accountant assumes.

    sampler = PoissonSampler(n=len(cache), sample_rate=256 / len(cache), seed=cfg.seed)
    idx = sampler.next_indices()                   # one logical step, same on every rank
    mine = split_for_rank(idx, rank, world_size)   # this rank's share of the per-example work

Every example joins each logical step independently with probability q (N Bernoulli draws per
step), so batch sizes vary (Binomial(N, q)) and may be 0. The sampler is global: every rank holds
the same state and draws the same indices. `state_dict()` is JSON-serialisable (the numpy bit
generator's state), so a resumed run draws exactly the batches it would have drawn.
"""
from __future__ import annotations

import numpy as np

from dpldm.errors import DpldmError


class PoissonSampler:
    """Draws sorted global int64 indices; each example included with probability `sample_rate`."""

    def __init__(self, n: int, sample_rate: float, seed: int):
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise DpldmError(f"PoissonSampler: n (dataset size) must be an integer >= 1; got {n!r}")
        if not (0.0 < sample_rate <= 1.0):
            raise DpldmError(f"PoissonSampler: sample_rate must be in (0, 1]; got {sample_rate!r}")
        self.n = int(n)
        self.sample_rate = float(sample_rate)
        self.seed = int(seed)
        self.steps_taken = 0
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 0x9015])))

    @property
    def expected_batch_size(self) -> float:
        return self.n * self.sample_rate

    def next_indices(self) -> np.ndarray:
        """Indices of the next logical step (sorted, int64, possibly empty)."""
        include = self._rng.random(self.n) < self.sample_rate
        self.steps_taken += 1
        return np.flatnonzero(include).astype(np.int64)

    def state_dict(self) -> dict:
        return {"n": self.n, "sample_rate": self.sample_rate, "seed": self.seed,
                "steps_taken": self.steps_taken, "bit_generator": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; refuses a state drawn for another dataset size or sample rate."""
        try:
            n, q, bitgen = int(state["n"]), float(state["sample_rate"]), state["bit_generator"]
            steps = int(state["steps_taken"])
        except (KeyError, TypeError, ValueError) as e:
            raise DpldmError(f"PoissonSampler: malformed sampler state (missing or bad {e})") from None
        if n != self.n or q != self.sample_rate:
            raise DpldmError(f"PoissonSampler: saved state is for n={n}, sample_rate={q}; this run has "
                             f"n={self.n}, sample_rate={self.sample_rate} (the accountant's q would be wrong)")
        if not isinstance(bitgen, dict) or bitgen.get("bit_generator") != "PCG64":
            raise DpldmError("PoissonSampler: malformed sampler state (bit_generator must be a PCG64 state)")
        self._rng.bit_generator.state = bitgen
        self.steps_taken = steps
        self.seed = int(state.get("seed", self.seed))


def split_for_rank(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's contiguous share of one step's indices (sizes differ by at most one)."""
    if world_size < 1 or not (0 <= rank < world_size):
        raise DpldmError(f"split_for_rank: need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
    n = len(indices)
    start, stop = rank * n // world_size, (rank + 1) * n // world_size
    return indices[start:stop]
