"""The run's privacy ledger: `RUN/privacy.json`, human-readable, written atomically.

    ledger = Ledger(delta=1e-5, target_epsilon=8, accountant="prv", noise_multiplier=1.1,
                    sample_rate=256 / 60000, max_grad_norm=1.0, noise_multiplicity=4,
                    dataset_size=60000, expected_batch_size=256)
    ledger.check_budget(next_steps=step + 1)  # PrivacyBudgetExceeded before overspending
    ledger.spend(steps_taken=step + 1)        # ε recomputed by the accountant
    ledger.save(run_dir)                      # appends {"step", "epsilon", "time"} to history

A ledger whose noise multiplier is 0 (or that is marked `private=False`) carries a loud
"NOT PRIVATE: ..." warning; its ε is infinite once it has taken a step. A ledger with
dataset_size 0 and no steps records a run that used no private data (ε = 0).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dpldm import __version__
from dpldm.errors import DpldmError, PrivacyBudgetExceeded
from dpldm.privacy import accountant as _accountant
from dpldm.run_dir import LEDGER

LEDGER_FILE = LEDGER
EXPLICIT_SEED_WARNING = ("EXPLICIT SEED: the noise and the Poisson batches are reproducible by whoever has the seed; "
                         "not a release")
BUDGET_RTOL = 1e-6


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _json_float(x: Optional[float]) -> Any:
    return "inf" if x is not None and math.isinf(x) else x


def _from_json_float(x: Any) -> Optional[float]:
    return math.inf if x == "inf" else (None if x is None else float(x))


@dataclass
class Ledger:
    """Everything needed to state (and re-check) the run's (ε, δ)-DP guarantee."""
    delta: float
    target_epsilon: float                 # the budget; check_budget refuses to exceed it
    accountant: str                       # rdp | prv | pld | dpa_rdp
    noise_multiplier: float               # σ: noise std is σ·C per coordinate per logical step
    sample_rate: float                    # q = expected_batch_size / dataset_size (Poisson)
    max_grad_norm: float                  # C: per-example clipping norm
    noise_multiplicity: int               # K (timestep, noise) draws averaged per example before clipping
    dataset_size: int                     # N private examples
    expected_batch_size: float            # q·N: the divisor of the noised gradient sum
    clip_groups: list[str] = field(default_factory=list)  # per-group clipping (each C/√G); [] = flat
    relation: str = "add_remove"          # neighbouring relation ε refers to: add_remove | replace_one
    seed: str = "secret"                  # secret (OS CSPRNG, kept in RUN/private/) | explicit (not a release)
    secure_rng: bool = False              # noise and sampling from a SHAKE-256 keystream (privacy.secure_rng)
    epsilon: float = 0.0                  # spent so far (after `steps` logical steps)
    steps: int = 0                        # logical steps taken
    sampling: str = "poisson"
    private: bool = True
    warnings: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)   # {"step", "epsilon", "time"} per save
    dpldm_version: str = __version__
    started: str = field(default_factory=_now)
    updated: str = ""

    def __post_init__(self) -> None:
        if self.touches_no_private_data:
            return                         # e.g. the public pretrained model alone: ε = 0 trivially
        _accountant.validate(self.sample_rate, self.delta, noise_multiplier=self.noise_multiplier,
                             steps=self.steps, dataset_size=self.dataset_size)
        if self.noise_multiplier == 0:
            self.private = False
        if self.seed == "explicit":
            self._warn(EXPLICIT_SEED_WARNING)
        if not self.private and not any(w.startswith("NOT PRIVATE") for w in self.warnings):
            self._warn("NOT PRIVATE: noise multiplier is 0 (epsilon is infinite)" if self.noise_multiplier == 0
                       else "NOT PRIVATE: this run makes no differential-privacy guarantee")

    @property
    def touches_no_private_data(self) -> bool:
        """A ledger with dataset_size 0 and no steps records a run that never saw private data."""
        return self.dataset_size == 0 and self.steps == 0

    def _warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)

    # accounting -------------------------------------------------------------------------------
    def epsilon_after(self, steps: int) -> float:
        """ε the accountant gives for `steps` logical steps with this ledger's σ, q, δ."""
        return _accountant.epsilon(self.noise_multiplier, self.sample_rate, steps, self.delta,
                                   self.accountant, self.relation)

    def spend(self, steps_taken: int) -> float:
        """Record that `steps_taken` logical steps have been taken in total; return ε spent."""
        if steps_taken < self.steps:
            raise DpldmError(f"privacy ledger: steps_taken={steps_taken} is below the {self.steps} "
                             "steps already recorded (a ledger never goes back)")
        self.epsilon = self.epsilon_after(steps_taken) if self.private else math.inf
        self.steps = int(steps_taken)
        return self.epsilon

    def check_budget(self, next_steps: int) -> None:
        """PrivacyBudgetExceeded if running to `next_steps` steps would exceed target_epsilon."""
        if not self.private or self.touches_no_private_data:
            return
        eps = self.epsilon_after(next_steps)
        if eps > self.target_epsilon * (1 + BUDGET_RTOL):
            raise PrivacyBudgetExceeded(
                f"privacy budget: {next_steps} steps would spend epsilon = {eps:.4g} > target_epsilon = "
                f"{self.target_epsilon:g} (sigma={self.noise_multiplier:g}, q={self.sample_rate:.4g}, "
                f"delta={self.delta:g}, {self.accountant}); {self.steps} steps taken, epsilon = {self.epsilon:.4g}")

    def check_same_mechanism(self, **settings: Any) -> None:
        """DpldmError naming every setting (e.g. noise_multiplier=..., sample_rate=...) that differs
        from this ledger: a resumed run must continue the same mechanism."""
        diffs = [f"{k}: ledger {getattr(self, k)!r}, now {v!r}" for k, v in settings.items()
                 if not _same(getattr(self, k), v)]
        if diffs:
            raise DpldmError("privacy ledger: the resumed run differs from its ledger (" + "; ".join(diffs)
                             + "); start a new run directory instead")

    # persistence ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["epsilon"] = _json_float(self.epsilon)
        d["history"] = [{**h, "epsilon": _json_float(h["epsilon"])} for h in self.history]
        return d

    def save(self, run_dir: str | Path) -> Path:
        """Append a history entry and write RUN/privacy.json atomically (tmp + fsync + rename)."""
        if not self.private and self.steps > 0:
            self.epsilon = math.inf        # a non-private run that trained on private data
        self.updated = _now()
        self.history.append({"step": self.steps, "epsilon": self.epsilon, "time": self.updated})
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LEDGER_FILE
        fd, tmp = tempfile.mkstemp(prefix=f".{LEDGER_FILE}.", suffix=".tmp", dir=run_dir)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            self.history.pop()
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @staticmethod
    def exists(run_dir: str | Path) -> bool:
        return (Path(run_dir) / LEDGER_FILE).is_file()

    @classmethod
    def load(cls, run_dir: str | Path) -> "Ledger":
        path = Path(run_dir) / LEDGER_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DpldmError(f"privacy ledger: {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DpldmError(f"privacy ledger: {path} is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise DpldmError(f"privacy ledger: {path} must hold a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing, unknown = sorted(required - data.keys()), sorted(data.keys() - names)
        if missing or unknown:
            raise DpldmError(f"privacy ledger: {path} is malformed (missing fields: {missing or 'none'}; "
                             f"unknown fields: {unknown or 'none'})")
        try:
            data["epsilon"] = _from_json_float(data.get("epsilon", 0.0))
            data["history"] = [{**h, "epsilon": _from_json_float(h["epsilon"])} for h in data.get("history", [])]
            return cls(**data)
        except DpldmError as e:
            raise DpldmError(f"privacy ledger: {path} holds bad values: {e}") from None
        except (TypeError, ValueError, KeyError) as e:
            raise DpldmError(f"privacy ledger: {path} holds a bad value ({e})") from None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b
