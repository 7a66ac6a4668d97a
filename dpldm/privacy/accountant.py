"""Privacy accountants for the Poisson-subsampled Gaussian mechanism (DP-SGD), and calibration.

    eps = epsilon(noise_multiplier=1.1, sample_rate=0.01, steps=1000, delta=1e-5, accountant="prv")
    sigma = noise_multiplier_for(target_epsilon=3.0, sample_rate=0.01, steps=1000, delta=1e-5)

Every number comes from a library accountant (nothing hand-rolled):
- "rdp":     opacus RDPAccountant (Rényi DP, then conversion to (ε, δ); a loose but simple bound),
- "prv":     opacus PRVAccountant (numerical composition of privacy-loss random variables; tight),
- "pld":     dp_accounting PLDAccountant (privacy-loss distributions; tight),
- "dpa_rdp": dp_accounting RdpAccountant (Rényi DP, independent implementation).
Neighbouring relation (`relation`): "add_remove" (one data set is the other plus one example; every
accountant) or "replace_one" (same size, one example swapped; "pld" only — dp_accounting's PLD supports
it for Poisson subsampling, the RDP accountants do not). A run that publishes its dataset size N
should state replace-one: under add/remove, neighbours have different N, so a released N tells them
apart (docs/privacy.md). Calibration is a bisection over σ that calls the chosen accountant.
`dpldm privacy epsilon|noise` is `main(args)`.
"""
from __future__ import annotations

import json
import logging
import math
import warnings

import dp_accounting
from dp_accounting import NeighboringRelation
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy.optimize import brentq

from dpldm.errors import DpldmError

ACCOUNTANTS = ("rdp", "prv", "pld", "dpa_rdp")
RELATIONS = ("add_remove", "replace_one")
REPLACE_ONE_ACCOUNTANTS = ("pld",)

# Above this RDP bound the numerical accountants (prv, pld) need minutes to hours; the RDP bound
# (always a valid upper bound on the tight ε) is reported instead. Such ε protect nothing anyway.
NUMERICAL_EPSILON_LIMIT = 100.0
_SIGMA_MAX = 1e4            # calibration gives up beyond this noise multiplier
_CALIBRATION_RTOL = 1e-3    # relative width of the final σ bracket


def validate(sample_rate: float, delta: float, noise_multiplier: float | None = None,
             steps: int | None = None, dataset_size: int | None = None) -> None:
    """Raise DpldmError (one line) for values no accountant can take."""
    if not (isinstance(sample_rate, (int, float)) and 0.0 < sample_rate <= 1.0):
        raise DpldmError(f"privacy: sample_rate must be in (0, 1]; got {sample_rate!r}")
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise DpldmError(f"privacy: delta must be in (0, 1); got {delta!r}")
    if noise_multiplier is not None and not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise DpldmError(f"privacy: noise_multiplier must be a finite number >= 0; got {noise_multiplier!r}")
    if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 0):
        raise DpldmError(f"privacy: steps must be an integer >= 0; got {steps!r}")
    if dataset_size is not None:
        if int(dataset_size) != dataset_size or dataset_size < 1:
            raise DpldmError(f"privacy: dataset_size must be an integer >= 1; got {dataset_size!r}")
        if delta >= 1.0 / dataset_size:
            raise DpldmError(f"privacy: delta should be < 1/N = {1.0 / dataset_size:.3g} "
                             f"(N = {dataset_size} examples); got delta = {delta:g}")


def _check_accountant(accountant: str, relation: str = "add_remove") -> None:
    if accountant not in ACCOUNTANTS:
        raise DpldmError(f"privacy: accountant must be one of {', '.join(ACCOUNTANTS)}; got {accountant!r}")
    if relation not in RELATIONS:
        raise DpldmError(f"privacy: relation must be one of {', '.join(RELATIONS)}; got {relation!r}")
    if relation == "replace_one" and accountant not in REPLACE_ONE_ACCOUNTANTS:
        raise DpldmError(f"privacy: accountant {accountant!r} supports relation add_remove only; use "
                         f"accountant={REPLACE_ONE_ACCOUNTANTS[0]} for relation replace_one")


def _quiet():
    """Silence the libraries' warnings about order ranges / series convergence (we pick the best)."""
    class _Ctx:
        def __enter__(self):
            self._w = warnings.catch_warnings()
            self._w.__enter__()
            warnings.simplefilter("ignore")
            self._level = logging.root.manager.disable
            logging.disable(logging.WARNING)

        def __exit__(self, *exc):
            logging.disable(self._level)
            self._w.__exit__(*exc)
    return _Ctx()


def _dpa_event(noise_multiplier: float, sample_rate: float, steps: int):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
        int(steps))


def _opacus_rdp(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    acc = RDPAccountant()
    acc.history = [(noise_multiplier, sample_rate, int(steps))]
    # opacus' default orders stop at 63; the wider dp_accounting set is tighter at large ε
    orders = sorted(set(acc.DEFAULT_ALPHAS) | set(DEFAULT_RDP_ORDERS))
    return float(acc.get_epsilon(delta=delta, alphas=orders))


def _opacus_prv(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                rough: float) -> float:
    acc = PRVAccountant()
    acc.history = [(noise_multiplier, sample_rate, int(steps))]
    # eps_error is absolute: keep it below ~1% of ε at small ε (costs ~10x mesh points there)
    eps_error = 0.01 if rough > 2.0 else 1e-3
    return float(acc.get_epsilon(delta=delta, eps_error=eps_error))


def _dpa_pld(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
             rough: float, relation: str = "add_remove") -> float:
    rel = NeighboringRelation.REPLACE_ONE if relation == "replace_one" else NeighboringRelation.ADD_OR_REMOVE_ONE
    # a coarser grid is pessimistic (still an upper bound), ~0.1% off at ε >~ 0.5 and 5x faster
    acc = PLDAccountant(neighboring_relation=rel, value_discretization_interval=1e-3 if rough > 1.0 else 1e-4)
    acc.compose(_dpa_event(noise_multiplier, sample_rate, steps))
    return float(acc.get_epsilon(delta))


def _dpa_rdp(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    acc = RdpAccountant()
    acc.compose(_dpa_event(noise_multiplier, sample_rate, steps))
    return float(acc.get_epsilon(delta))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: str = "prv", relation: str = "add_remove") -> float:
    """ε spent after `steps` Poisson-subsampled Gaussian steps (σ = 0 → inf, steps = 0 → 0), under `relation`."""
    _check_accountant(accountant, relation)
    validate(sample_rate, delta, noise_multiplier=noise_multiplier, steps=steps)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    try:
        with _quiet():
            if accountant == "dpa_rdp":
                return _dpa_rdp(noise_multiplier, sample_rate, steps, delta)
            rough = _opacus_rdp(noise_multiplier, sample_rate, steps, delta)   # add/remove bound
            if relation == "replace_one":          # replace-one ε >= add/remove ε: no shortcut by RDP
                return _dpa_pld(noise_multiplier, sample_rate, steps, delta, rough, relation)
            if accountant == "rdp" or rough > NUMERICAL_EPSILON_LIMIT:
                return rough
            if accountant == "prv":
                return _opacus_prv(noise_multiplier, sample_rate, steps, delta, rough)
            return _dpa_pld(noise_multiplier, sample_rate, steps, delta, rough)
    except (ValueError, ArithmeticError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DpldmError(f"privacy: accountant {accountant!r} failed for sigma={noise_multiplier}, "
                         f"q={sample_rate}, steps={steps}, delta={delta}: {msg}; try accountant=rdp") from None


def noise_multiplier_for(target_epsilon: float, sample_rate: float, steps: int, delta: float,
                         accountant: str = "prv", relation: str = "add_remove") -> float:
    """Smallest σ (within ~0.1% relative) whose ε after `steps` is <= target_epsilon.

    A bisection-style root search that only calls `epsilon`: the cheap RDP bound brackets the
    answer first (tight accountants need a σ no larger than RDP's), then Brent's method refines
    it, and the returned σ is always one whose ε was checked to be <= target_epsilon. Under replace-one
    the add/remove RDP answer is only a starting point: the bracket is widened until it holds.
    """
    _check_accountant(accountant, relation)
    validate(sample_rate, delta, steps=steps)
    if not (isinstance(target_epsilon, (int, float)) and target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise DpldmError(f"privacy: target_epsilon must be a finite number > 0; got {target_epsilon!r}")
    if steps == 0:
        return 0.0
    seen: dict[tuple[float, str], float] = {}

    def gap(sigma: float, acc: str = accountant) -> float:   # > 0 means over budget
        if (sigma, acc) not in seen:
            eps = epsilon(sigma, sample_rate, steps, delta, acc, relation if acc == accountant else "add_remove")
            seen[sigma, acc] = math.log(eps) - math.log(target_epsilon)
        return seen[sigma, acc]

    first = "dpa_rdp" if accountant in ("prv", "pld") else accountant
    hi = 1.0
    while gap(hi, first) > 0:
        hi *= 2.0
        if hi > _SIGMA_MAX:
            raise DpldmError(f"privacy: target_epsilon={target_epsilon} is out of reach (needs "
                             f"noise_multiplier > {_SIGMA_MAX:g} for q={sample_rate}, steps={steps})")
    lo = hi / 2.0
    while lo > 1e-3 and gap(lo, first) <= 0:
        hi, lo = lo, lo / 2.0
    if first != accountant:            # [lo, hi] brackets RDP's answer; the tight one is at most that
        sigma_rdp = brentq(gap, lo, hi, args=(first,), xtol=_CALIBRATION_RTOL * lo)
        hi = sigma_rdp * (1 + _CALIBRATION_RTOL)
        while gap(hi) > 0:              # numerical accountants are not exactly below RDP everywhere
            hi *= 1.1                   # (and replace-one needs more noise than add/remove)
        lo = hi * 0.85
        while lo > 1e-3 and gap(lo) <= 0:
            hi, lo = lo, lo * 0.85
    if gap(lo) <= 0:                    # below 1e-3 every σ is within budget
        return lo
    sigma = brentq(gap, lo, hi, xtol=0.25 * _CALIBRATION_RTOL * lo)
    for _ in range(100):                # return a σ verified to be within budget
        if gap(sigma) <= 0:
            return sigma
        sigma = min(sigma * (1 + 0.25 * _CALIBRATION_RTOL), hi)
    return hi


def main(args) -> int:
    """`dpldm privacy epsilon|noise`: print one JSON object on stdout."""
    validate(args.sample_rate, args.delta, steps=args.steps, dataset_size=args.dataset_size,
             noise_multiplier=getattr(args, "noise_multiplier", None))
    relation = getattr(args, "relation", "add_remove")
    common = {"sample_rate": args.sample_rate, "steps": args.steps, "delta": args.delta,
              "accountant": args.accountant, "relation": relation}
    if args.dataset_size:
        common["dataset_size"] = args.dataset_size
        common["expected_batch_size"] = args.sample_rate * args.dataset_size
    if args.privacy_verb == "epsilon":
        eps = epsilon(args.noise_multiplier, args.sample_rate, args.steps, args.delta, args.accountant, relation)
        out = {"epsilon": eps if math.isfinite(eps) else "inf", "noise_multiplier": args.noise_multiplier}
    else:
        sigma = noise_multiplier_for(args.epsilon, args.sample_rate, args.steps, args.delta, args.accountant,
                                     relation)
        eps = epsilon(sigma, args.sample_rate, args.steps, args.delta, args.accountant, relation)
        out = {"noise_multiplier": sigma, "epsilon": eps, "target_epsilon": args.epsilon}
    print(json.dumps({**out, **common}))
    return 0
