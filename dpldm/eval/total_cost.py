"""The total privacy cost of everything a report publishes about one private set (privacy invariant 10,
docs/privacy.md).

    cost = total_cost(rows, run_ledgers)      # rows as in dpldm.eval.report; run_ledgers {run path: ledger}

Every private training whose result the report publishes (a table row, a sample grid) is a release about
the same private set, so their (ε, δ) add up. Each row keeps its own ε; the total is stated twice:
- **basic composition**: the sum of the ε and the sum of the δ of every training (always valid, loose);
- **PLD composition**: dp_accounting's `PLDAccountant` composing each training's Poisson-subsampled Gaussian
  mechanism (σ = noise_multiplier, q = sample_rate, T = steps, from its ledger) exactly, at δ = the summed δ
  (tighter; possible only when every training names its mechanism).
A row that trained several models (`dpldm evaluate --seeds S`: S DP-SGD classifiers, each at the row's ε)
counts S trainings. Rows that use no private data (ε = 0) and published paper figures are excluded; rows
with no DP (ε = ∞) are listed as such: while they are published, the report as a whole has no finite ε.
Both totals assume the trainings' noise is independent: an explicit seed voids that, and is flagged.
"""
from __future__ import annotations

import math

import dp_accounting
from dp_accounting import NeighboringRelation
from dp_accounting.pld import PLDAccountant

RELATION_NAMES = {"add_remove": "add/remove-one", "replace_one": "replace-one"}
MECHANISM_FIELDS = ("noise_multiplier", "sample_rate", "steps")
BASIC = "basic composition (sum of the ε and of the δ of every private training)"
PLD = ("PLD composition (dp_accounting PLDAccountant, exact composition of every training's "
       "Poisson-subsampled Gaussian mechanism from its ledger's σ, q and steps)")


def has_explicit_seed(ledger_or_row: dict) -> bool:
    """True when a ledger (or row) says its randomness came from an explicit, reproducible seed."""
    if ledger_or_row.get("seed") == "explicit":
        return True
    return any("explicit seed" in str(w).lower() for w in ledger_or_row.get("warnings", []) or [])


def training(ledger: dict) -> dict:
    """The fields of one private training that composition needs, from its ledger (or a row)."""
    return {"epsilon": float(ledger["epsilon"]), "delta": ledger.get("delta"),
            "noise_multiplier": ledger.get("noise_multiplier"), "sample_rate": ledger.get("sample_rate"),
            "steps": ledger.get("steps"), "sampling": ledger.get("sampling", ""),
            "relation": ledger.get("relation", "add_remove"), "accountant": ledger.get("accountant", ""),
            "explicit_seed": has_explicit_seed(ledger)}


def row_kind(row: dict) -> str:
    """paper | not_private (ε = ∞) | no_private_data (ε = 0) | private."""
    if row.get("paper"):
        return "paper"
    eps = row.get("epsilon")
    if row.get("private") is False or eps is None or not math.isfinite(float(eps)):
        return "not_private"
    return "no_private_data" if float(eps) == 0 else "private"


def _trainings_of(row: dict) -> list[dict]:
    if row.get("trainings"):
        return list(row["trainings"])
    return [training(row)]


def total_cost(rows: list[dict], run_ledgers: dict[str, dict] | None = None) -> dict:
    """The releases (one per row, or per run published only through its samples) and their total cost."""
    row_runs = {str(r["run"]) for r in rows if r.get("run")}
    entries = list(rows) + [_ledger_row(run, led) for run, led in (run_ledgers or {}).items() if run not in row_runs]
    releases, seen_runs, not_private, no_private_data = [], set(), [], []
    for row in entries:
        kind, run = row_kind(row), str(row.get("run") or "")
        if kind == "paper" or (run and run in seen_runs):
            continue                                    # not trained here / the same run counted once
        seen_runs.add(run)
        if kind == "not_private":
            not_private.append(_name(row))
        elif kind == "no_private_data":
            no_private_data.append(_name(row))
        else:
            releases.append({"what": _name(row), "trainings": _trainings_of(row)})
    trainings = [t for r in releases for t in r["trainings"]]
    out = {"releases": releases, "count": len(trainings), "not_private": not_private,
           "no_private_data": no_private_data,
           "explicit_seed": [r["what"] for r in releases if any(t["explicit_seed"] for t in r["trainings"])],
           "basic": None, "pld": None, "pld_note": ""}
    if not trainings:
        return out
    deltas = [t["delta"] for t in trainings]
    delta = sum(float(d) for d in deltas) if all(d is not None for d in deltas) else None
    relations = sorted({t["relation"] for t in trainings})
    out["basic"] = {"epsilon": sum(t["epsilon"] for t in trainings), "delta": delta, "method": BASIC,
                    "relations": relations}
    out["pld"], out["pld_note"] = _pld_total(trainings, delta, relations)
    return out


def _ledger_row(run: str, ledger: dict) -> dict:
    """A pseudo-row for a run whose samples are published but that has no row of its own."""
    eps = ledger.get("epsilon")
    eps = math.inf if eps in (None, "inf") or not ledger.get("private", False) else float(eps)
    return {**ledger, "method": "samples", "run": run, "epsilon": eps, "private": ledger.get("private", False)}


def _name(row: dict) -> str:
    """The row's method and what tells it apart: its run, else its ε."""
    run, eps = row.get("run"), row.get("epsilon")
    if run:
        return row["method"] if str(run) in row["method"] else f"{row['method']} ({run})"
    if row_kind(row) == "private":
        return f"{row['method']} at ε = {float(eps):.3g}"
    return row["method"]


def _pld_total(trainings: list[dict], delta: float | None, relations: list[str]) -> tuple[dict | None, str]:
    """(PLD total or None, why not)."""
    missing = [t for t in trainings if any(t.get(k) in (None, "") for k in MECHANISM_FIELDS)
               or t.get("sampling") not in ("poisson", "")]
    if missing:
        return None, "not computed: a training does not name its Poisson-subsampled Gaussian mechanism (σ, q, steps)"
    if delta is None or not 0 < delta < 1:
        return None, "not computed: a training's δ is unknown"
    if any(float(t["noise_multiplier"]) <= 0 for t in trainings):
        return None, "not computed: a training has σ = 0"
    relation = "replace_one" if "replace_one" in relations else "add_remove"
    rel = NeighboringRelation.REPLACE_ONE if relation == "replace_one" else NeighboringRelation.ADD_OR_REMOVE_ONE
    basic = sum(t["epsilon"] for t in trainings)
    # a coarser grid is pessimistic (still an upper bound) and much faster at large ε
    acc = PLDAccountant(neighboring_relation=rel, value_discretization_interval=1e-3 if basic > 1 else 1e-4)
    for t in trainings:
        if int(t["steps"]) > 0:
            acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
                float(t["sample_rate"]), dp_accounting.GaussianDpEvent(float(t["noise_multiplier"]))), int(t["steps"])))
    return {"epsilon": float(acc.get_epsilon(delta)), "delta": delta, "relation": relation, "method": PLD}, ""


def markdown(cost: dict) -> list[str]:
    """The report's "Total privacy cost" section (markdown lines)."""
    lines = ["## Total privacy cost", ""]
    if not cost["releases"]:
        lines += ["No private training on the private data is published here."]
    else:
        lines += [f"Everything below was trained on the same private set and is published in this report: "
                  f"{cost['count']} private training(s). Each row of the results keeps its own ε; together they "
                  "cost:", "", "| release | trainings | ε each | δ each | relation | mechanism |",
                  "|---|---|---|---|---|---|"]
        for r in cost["releases"]:
            ts = r["trainings"]
            eps = ", ".join(dict.fromkeys(f"{t['epsilon']:.3g}" for t in ts))
            dl = ", ".join(dict.fromkeys(f"{t['delta']:g}" if t["delta"] is not None else "?" for t in ts))
            mech = "; ".join(dict.fromkeys(
                f"σ={float(t['noise_multiplier']):.3g}, q={float(t['sample_rate']):.3g}, T={t['steps']}"
                if all(t.get(k) is not None for k in MECHANISM_FIELDS) else "–" for t in ts))
            seed = " **⚠ EXPLICIT SEED**" if any(t["explicit_seed"] for t in ts) else ""
            lines.append(f"| {r['what']}{seed} | {len(ts)} | {eps} | {dl} | "
                         f"{', '.join(sorted({t['relation'] for t in ts}))} | {mech} |")
        b = cost["basic"]
        delta = f"{b['delta']:.3g}" if b["delta"] is not None else "unknown (a δ is missing)"
        lines += ["", f"- **Total by {b['method']}: ε = {b['epsilon']:.3g}, δ = {delta}.**"]
        if len(b["relations"]) > 1:
            lines.append("  The rows state different neighbouring relations; replace-one ε ≥ add/remove ε, so "
                         "the sum is an add/remove bound.")
        if cost["pld"]:
            p = cost["pld"]
            lines.append(f"- **Total by {p['method']}: ε = {p['epsilon']:.3g} at δ = {p['delta']:.3g} "
                         f"({RELATION_NAMES[p['relation']]} relation).** Both totals are valid upper bounds; "
                         "the PLD one is tighter.")
        else:
            lines.append(f"- PLD composition {cost['pld_note']}.")
    if cost["explicit_seed"]:
        lines.append(f"- **⚠ {', '.join(cost['explicit_seed'])}: explicit seed — the noise is reproducible by "
                     "whoever has the seed, so neither its own ε nor these totals hold; not a release.**")
    if cost["not_private"]:
        lines.append(f"- **NOT PRIVATE (ε = ∞): {', '.join(cost['not_private'])}.** While these are published, "
                     "the report as a whole carries no finite privacy guarantee.")
    if cost["no_private_data"]:
        lines.append(f"- Excluded, use no private data (ε = 0): {', '.join(cost['no_private_data'])}.")
    lines.append("- Published paper figures are not trained here and cost nothing.")
    return lines + [""]
