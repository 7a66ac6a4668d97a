"""Every random stream of a run, derived from one run seed by purpose and keys: one place to audit.

    seed = secret_seed()                                   # 128 bits from the OS CSPRNG (default)
    rng = RunRandomness(seed)
    rng.torch("noise", step)                               # the DP noise of one logical step
    rng.numpy("poisson")                                   # the Poisson sampler's bit generator
    rng.torch("example", step, index)                      # an example's (t, noise, dropout) draws
    NoiseStream(rng, "noise", step, secure=True).normal(shape)   # secure mode: keyed SHAKE-256 keystream

Streams are independent by construction: each is seeded from `SeedSequence(seed, spawn_key=(purpose,
*keys))` (the purpose is hashed to an integer), so no two (purpose, keys) pairs share a state and no
arithmetic on seeds (`seed + rank`, `seed ^ 0x5F1F`) can make two streams collide.

A private run's seed is secret (docs/privacy.md): anyone holding it regenerates the noise and the batches,
and the guarantee is void. It lives in the run's private state (`RUN/private/`), never in config.yaml, the
ledger, logs, reports, exports or samples. An explicit `seed=N` is for tests and research reproducibility:
the ledger then marks the run "not a release".
"""
from __future__ import annotations

import hashlib
import secrets

import numpy as np
import torch

from dpldm.errors import DpldmError

SECRET_SEED_BITS = 128


def secret_seed() -> int:
    """A fresh run seed of SECRET_SEED_BITS bits from the OS CSPRNG (`secrets`)."""
    return secrets.randbits(SECRET_SEED_BITS)


def _purpose_key(purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(purpose.encode()).digest()[:8], "little")


class RunRandomness:
    """Named, keyed random streams of one run, all derived from `seed` (a non-negative int)."""

    def __init__(self, seed: int):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DpldmError(f"rng: the run seed must be a non-negative integer; got {seed!r}")
        self.seed = seed

    def _sequence(self, purpose: str, keys: tuple[int, ...]) -> np.random.SeedSequence:
        if any(isinstance(k, bool) or int(k) != k or k < 0 for k in keys):
            raise DpldmError(f"rng: stream keys must be non-negative integers; got {keys!r}")
        return np.random.SeedSequence(self.seed, spawn_key=(_purpose_key(purpose), *(int(k) for k in keys)))

    def int_seed(self, purpose: str, *keys: int) -> int:
        """A 63-bit integer seed for a (purpose, keys) stream (for APIs that take an int seed)."""
        return int(self._sequence(purpose, keys).generate_state(1, dtype=np.uint64)[0]) >> 1

    def torch(self, purpose: str, *keys: int, device: str | torch.device = "cpu") -> torch.Generator:
        """A torch.Generator for (purpose, keys); the same draws on every rank of one device type."""
        gen = torch.Generator(device=device)
        gen.manual_seed(self.int_seed(purpose, *keys))
        return gen

    def numpy(self, purpose: str, *keys: int) -> np.random.Generator:
        """A numpy Generator (PCG64, 128-bit state) for (purpose, keys)."""
        return np.random.Generator(np.random.PCG64(self._sequence(purpose, keys)))

    def secure_uniform(self, purpose: str, *keys: int, numel: int) -> np.ndarray:
        """`numel` float64 uniforms in [0, 1) from a cryptographic keystream (secure mode).

        The keystream is SHAKE-256 of a 256-bit key derived from the run seed and (purpose, keys): a CSPRNG
        keyed by the secret seed, so every rank derives the same draws without communication and no generator
        state can be recovered from outputs. 53-bit uniforms; cost ~8 bytes of SHAKE-256 per draw (~160 MB/s
        on this CPU, docs/privacy.md).
        """
        if numel < 0:
            raise DpldmError(f"rng: numel must be >= 0; got {numel}")
        key = self._sequence(purpose, keys).generate_state(8, dtype=np.uint32).tobytes()
        words = np.frombuffer(hashlib.shake_256(key).digest(8 * numel), dtype=np.uint64)
        return (words >> np.uint64(11)).astype(np.float64) / 2.0 ** 53

    def secure_normal(self, purpose: str, *keys: int, numel: int) -> torch.Tensor:
        """`numel` float32 N(0, 1) draws from `secure_uniform` (Box-Muller in float64)."""
        half = (numel + 1) // 2
        u = self.secure_uniform(purpose, *keys, numel=2 * half).reshape(2, half)
        r = np.sqrt(-2.0 * np.log1p(-u[0]))                  # 1 - u in (0, 1]: finite
        z = np.concatenate([r * np.cos(2 * np.pi * u[1]), r * np.sin(2 * np.pi * u[1])])[:numel]
        return torch.from_numpy(z.astype(np.float32))


# How far each sampler's N(0, 1) draws reach (docs/privacy.md, "Floating point"). Outputs beyond a neighbour's
# largest draw are impossible under that neighbour, so a truncated tail adds about T * P(Z > reach - 1/sigma) to
# delta (a whole clipped gradient on one coordinate). float32 samplers stop early: torch's CUDA randn (Box-Muller
# on 32-bit uniforms) at 6.76, numpy's float32 ziggurat at 8.21 -- the first adds 5.5e-4 over the quickstart's
# 160 steps at sigma = 0.44, fifty times its delta. Every stream therefore draws in float64 and rounds.
NOISE_TAILS = {"numpy float64 ziggurat (CPU)": 13.7, "torch float64 Box-Muller (CUDA Philox)": 8.65,
               "SHAKE-256 float64 Box-Muller (secure)": 8.57}


class NoiseStream:
    """The N(0, 1) draws of one (purpose, keys) stream, taken in call order, on `device`.

    Default: CPU draws come from numpy's PCG64 (128-bit state; torch's CPU generator keeps only 32 bits of
    its seed), CUDA draws from torch's Philox generator (64-bit seed) — fast, not cryptographic. Both draw in
    float64 and round to float32 (NOISE_TAILS: a float32 sampler's tail ends too soon).
    `secure=True`: SHAKE-256 keystream (`RunRandomness.secure_normal`), drawn on the CPU and copied.
    Every rank with the same run seed draws the same numbers on the same device type; `checksum` sums
    all draws (float64) so ranks can compare what they added (dpldm/distributed/agreement.py).
    """

    def __init__(self, rng: RunRandomness, purpose: str, *keys: int, device: str | torch.device = "cpu",
                 secure: bool = False):
        self.rng, self.purpose, self.keys = rng, purpose, keys
        self.device, self.secure = torch.device(device), secure
        self.calls = 0
        self._sum = torch.zeros((), dtype=torch.float64, device=self.device)   # summed on the device: no sync per call
        self._numpy = None if secure or self.device.type != "cpu" else rng.numpy(purpose, *keys)
        self._torch = rng.torch(purpose, *keys, device=self.device) if not secure and self._numpy is None else None

    def normal(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        numel = int(np.prod(shape)) if len(shape) else 1
        if self.secure:
            z = self.rng.secure_normal(self.purpose, *self.keys, self.calls, numel=numel).to(self.device)
        elif self._numpy is not None:   # float64 draws rounded to float32: see NOISE_TAILS
            z = torch.from_numpy(self._numpy.standard_normal(numel)).float()
        else:
            z = torch.randn(numel, generator=self._torch, device=self.device, dtype=torch.float64).float()
        self.calls += 1
        self._sum += z.sum(dtype=torch.float64)
        return z.reshape(shape)

    @property
    def checksum(self) -> float:
        """The float64 sum of every draw so far (one device sync, when read)."""
        return float(self._sum)
