"""Evaluation reports: report.json + report.md with the results table, the total privacy cost of everything
published (privacy invariant 10, docs/privacy.md), the privacy–utility plot, sample grids labelled by class,
each run's privacy ledger (loud NOT PRIVATE / explicit-seed marking), set sizes and stage timings as tables.

    rows = [row_from_ledger("DP-LDM (loda)", read_ledger(run), acc, fid), ...]
    write_report("runs/x/report", rows, runs=["runs/x"], paper_rows=[...], selection_note="...")

A row is a dict: method, epsilon, delta, accountant, sampling, private, acc_mean, acc_std, acc_runs,
fid, fid_n, notes, warnings, run, trainings (all optional but method). `trainings` lists the ledgers of
every model the row stands for (e.g. one DP-SGD classifier per seed): the total cost counts each.
A row with ε = 0 uses no private data (`zero_cost_row`): it is a baseline the private rows must beat.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from dpldm.errors import DpldmError
from dpldm.eval import total_cost as tc
from dpldm.eval.report_figures import grid_for, plot_privacy_utility
from dpldm.run_dir import RunDir

PRIVACY_SCOPE = ("The (ε, δ) guarantee covers the private fine-tuning data only: each private example's "
                 "influence on the released model and samples is bounded. It says nothing about the public "
                 "data the autoencoder and U-Net were pretrained on, nor about the real test set used here.")
SELECTION_DEFAULT = ("Not declared. Any checkpoint, hyper-parameter or run chosen by a metric computed on "
                     "private data is itself a release not covered by ε (privacy invariant 6, docs/privacy.md); "
                     "state it here.")


def read_ledger(run_dir: str | Path) -> dict:
    """The run's privacy.json as a dict (DpldmError naming the file when missing or invalid)."""
    path = RunDir(run_dir).ledger
    if not path.is_file():
        raise DpldmError(f"report: {path} not found (every run dir needs its privacy ledger)")
    try:
        ledger = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DpldmError(f"report: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(ledger, dict):
        raise DpldmError(f"report: {path} must hold a JSON object")
    return ledger


def is_private(ledger: dict) -> bool:
    eps = ledger.get("epsilon")
    return bool(ledger.get("private", False)) and eps is not None and math.isfinite(float(eps))


def row_from_ledger(method: str, ledger: dict, acc: dict | None = None, fid: dict | None = None,
                    run: str = "", notes: str = "", ledgers: list[dict] | None = None) -> dict:
    """One table row from a ledger, an evaluate_synthetic result and a FID result. `ledgers`: the ledgers of
    every model the row stands for (default: [ledger]); the report's total cost counts each."""
    private = is_private(ledger)
    row = {
        "method": method, "run": run, "private": private,
        "epsilon": float(ledger["epsilon"]) if private else math.inf,
        "delta": ledger.get("delta"), "accountant": ledger.get("accountant", ""),
        "sampling": ledger.get("sampling", ""), "noise_multiplier": ledger.get("noise_multiplier"),
        "sample_rate": ledger.get("sample_rate"), "steps": ledger.get("steps"),
        "relation": ledger.get("relation", "add_remove"), "seed": ledger.get("seed", ""),
        "warnings": list(dict.fromkeys(w for led in (ledgers or [ledger]) for w in led.get("warnings", []) or [])),
        "notes": notes,
        "trainings": [tc.training(led) for led in (ledgers or [ledger]) if is_private(led)
                      and float(led["epsilon"]) > 0],
    }
    if acc:
        row.update(acc_mean=acc["mean"], acc_std=acc["std"], acc_runs=acc.get("runs", []),
                   n_train=acc.get("n_train"), n_test=acc.get("n_test"), augment=acc.get("augment", "none"),
                   label_smoothing=acc.get("label_smoothing", 0.0))
    if fid:
        row.update(fid=fid["fid"], fid_n=fid.get("n_fake"))
    return row


def zero_cost_row(method: str, acc: dict | None = None, notes: str = "") -> dict:
    """A baseline that uses no private data (ε = 0): the pretrained model only, a classifier trained on the
    public data. Every private row must beat it to earn its privacy cost."""
    return row_from_ledger(method, {"epsilon": 0.0, "delta": 0.0, "private": True, "accountant": "none",
                                    "sampling": "none", "steps": 0, "dataset_size": 0,
                                    "warnings": ["uses no private data"]}, acc, notes=notes)


def _fmt_eps(e) -> str:
    if e is None:
        return "–"
    if not math.isfinite(float(e)):
        return "∞ (no DP)"
    return "0 (no private data)" if float(e) == 0 else f"{float(e):.3g}"


def _fmt_acc(r: dict) -> str:
    if r.get("acc_mean") is None:
        return "–"
    s = f"{100 * r['acc_mean']:.1f}"
    return s + (f" ± {100 * r['acc_std']:.1f}" if r.get("acc_std") else "")


def write_report(out_dir: str | Path, rows: list[dict], runs: list[str | Path] = (),
                 paper_rows: list[dict] | None = None, selection_note: str = "",
                 set_sizes: dict | None = None, title: str = "dpldm evaluation", discussion: str = "") -> dict:
    """Write out_dir/report.json and report.md (+ grids/, privacy_utility.png). Returns the JSON dict.
    `discussion` (markdown) is printed under "Reading the results", after the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        if "method" not in r:
            raise DpldmError(f"report: every row needs a 'method'; got keys {sorted(r)}")
    run_info = []
    for run in runs:
        run = Path(run)
        ledger = read_ledger(run)
        run_info.append({"run": str(run), "private": is_private(ledger), "ledger": ledger,
                         "no_private_data": is_private(ledger) and float(ledger["epsilon"]) == 0,
                         "explicit_seed": tc.has_explicit_seed(ledger), "grid": grid_for(run, out)})
    paper_rows = [dict(r, paper=True, notes=r.get("notes", "published")) for r in (paper_rows or [])]
    all_rows = list(rows) + paper_rows
    plot = "privacy_utility.png" if plot_privacy_utility(all_rows, out / "privacy_utility.png") else None
    not_private = [r for r in rows if r.get("private") is False] + [i for i in run_info if not i["private"]]
    report = {
        "title": title, "rows": rows, "paper_rows": paper_rows, "runs": run_info, "plot": plot,
        "total_privacy_cost": tc.total_cost(rows, {i["run"]: i["ledger"] for i in run_info}),
        "privacy_scope": PRIVACY_SCOPE,
        "selection_on_private_data": selection_note or SELECTION_DEFAULT,
        "set_sizes": set_sizes or {}, "discussion": discussion,
        "not_private": sorted({str(r.get("run") or r.get("method")) for r in not_private}),
    }
    (out / "report.json").write_text(json.dumps(_strict_json(report), indent=2, default=str, allow_nan=False))
    (out / "report.md").write_text(_markdown(report))
    return report


def _strict_json(obj):
    """Infinite ε (no DP) as the string "inf": report.json stays standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else None)
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    return obj


def _fmt_num(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _flag(r: dict) -> str:
    return " **⚠ EXPLICIT SEED: not a release**" if tc.has_explicit_seed(r) else ""


def _notes(r: dict) -> str:
    """Notes of a row: NOT PRIVATE once (bold), explicit seed loudly, then the notes and other warnings."""
    warnings = list(dict.fromkeys(r.get("warnings", []) or []))
    loud = [f"**{w}**" for w in warnings if w.startswith("NOT PRIVATE") or "explicit seed" in w.lower()]
    if r.get("private") is False and not any(w.startswith("NOT PRIVATE") for w in warnings):
        loud.insert(0, "**NOT PRIVATE**")
    quiet = [w for w in warnings if not (w.startswith("NOT PRIVATE") or "explicit seed" in w.lower())]
    if len(r.get("trainings") or []) > 1:
        quiet.insert(0, f"{len(r['trainings'])} models trained, each at this ε (all counted in the total)")
    return "; ".join(x for x in [*loud, r.get("notes", ""), *quiet] if x)


def _run_status(info: dict) -> str:
    if not info["private"]:
        return "**NOT PRIVATE**"
    if info["no_private_data"]:
        return "uses no private data, ε = 0"
    return "private" + _flag(info["ledger"])


def _tables(rep: dict) -> list[str]:
    """Set sizes and stage timings, each as a table."""
    sizes = dict(rep["set_sizes"])
    timings = sizes.pop("timings_s", None)
    all_times = sizes.pop("timings_all_s", None)    # a resumed run: each stage summed over every invocation
    lines = []
    if sizes:
        lines += ["", "## Set sizes", "", "| set | size |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sizes.items()]
        lines += ["", "FID on fewer than 10k images is biased upward: compare only at equal sizes."]
    if isinstance(timings, dict) and timings:
        lines += ["", "## Stage timings", ""]
        if isinstance(all_times, dict) and all_times:
            lines += ["| stage | seconds, all invocations | minutes, all invocations | seconds, this invocation |",
                      "|---|---:|---:|---:|"]
            for k, v in timings.items():
                total = all_times.get(k, v)
                name = f"**{k}**" if k == "total" else k
                lines.append(f"| {name} | {float(total):.0f} | {float(total) / 60:.1f} | {float(v):.0f} |")
            lines += ["", "This run was resumed by re-running it: \"all invocations\" sums the time of every "
                      "invocation in its folder (stopped ones included), what the run cost end to end; \"this "
                      "invocation\" counts only the work done in the last one."]
            return lines
        lines += ["| stage | seconds | minutes |", "|---|---:|---:|"]
        for k, v in timings.items():
            cells = [f"{float(v):.0f}", f"{float(v) / 60:.1f}"] if isinstance(v, (int, float)) else [str(v), ""]
            name = f"**{k}**" if k == "total" else k
            lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
        lines += ["", "Times of this invocation; its folder records no earlier one (the quickstart's timings.json). "
                  "A stage found done counts only the work done in this invocation."]
    return lines


def _zero_cost_check(rep: dict) -> list[str]:
    """Which private rows do not beat the best zero-privacy-cost (ε = 0) baseline."""
    zero = [r for r in rep["rows"] if tc.row_kind(r) == "no_private_data" and r.get("acc_mean") is not None]
    if not zero:
        return []
    best = max(zero, key=lambda r: r["acc_mean"])
    below = [r for r in rep["rows"] if tc.row_kind(r) == "private" and r.get("acc_mean") is not None
             and r["acc_mean"] <= best["acc_mean"]]
    line = (f"Best zero-privacy-cost baseline (ε = 0, no private data): {best['method']}, "
            f"{100 * best['acc_mean']:.1f}%. ")
    line += ("Every private row beats it." if not below else "**Private rows that do NOT beat it (their privacy cost "
             "buys nothing here): " + ", ".join(f"{r['method']} at ε = {_fmt_eps(r['epsilon'])} "
                                               f"({100 * r['acc_mean']:.1f}%)" for r in below) + ".**")
    return ["", line]


def _markdown(rep: dict) -> str:
    lines = [f"# {rep['title']}", ""]
    for info in rep["runs"]:
        if not info["private"]:
            lines += [f"> **⚠ NOT PRIVATE: run `{info['run']}` has no finite ε (ledger private=false). "
                      "Its samples carry no differential-privacy guarantee.**", ""]
        elif info["explicit_seed"]:
            lines += [f"> **⚠ EXPLICIT SEED: run `{info['run']}` drew its noise from an explicit seed: whoever has "
                      "the seed can remove the noise. Not a release.**", ""]
    lines += ["## Results", "",
              "| method | ε | δ | accountant | sampling | accuracy (%) mean ± std | FID (n) | notes |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"] + rep["paper_rows"]:
        fid = f"{r['fid']:.1f} ({r.get('fid_n', '?')})" if r.get("fid") is not None else "–"
        delta = r.get("delta") if r.get("delta") is not None and tc.row_kind(r) != "no_private_data" else "–"
        acct, sampling = (r.get(k) if r.get(k) not in ("none", "") else None for k in ("accountant", "sampling"))
        lines.append(f"| {r['method']} | {_fmt_eps(r.get('epsilon'))}{_flag(r)} | {delta} "
                     f"| {acct or '–'} | {sampling or '–'} | {_fmt_acc(r)} | {fid} | {_notes(r)} |")
    lines += _zero_cost_check(rep)
    lines += [""] + tc.markdown(rep["total_privacy_cost"])
    if rep.get("discussion"):
        lines += ["## Reading the results", "", rep["discussion"], ""]
    if rep["plot"]:
        lines += ["## Privacy–utility", "", f"![accuracy vs epsilon]({rep['plot']})", "",
                  "ε on a log axis; rows with ε = 0 (no private data) and with no DP (ε = ∞) are horizontal "
                  "reference lines.", ""]
    lines += ["## Runs", ""]
    for info in rep["runs"]:
        led = info["ledger"]
        lines += [f"### `{info['run']}` ({_run_status(info)})", ""]
        if info["no_private_data"]:
            lines.append("ε = 0: " + ("; ".join(led.get("warnings", []) or []) or "uses no private data"))
        else:
            lines.append(f"ε = {_fmt_eps(led.get('epsilon'))}, δ = {led.get('delta')}, accountant = "
                         f"{led.get('accountant')}, relation = {led.get('relation', 'add_remove')}, sampling = "
                         f"{led.get('sampling')}, σ = {_fmt_num(led.get('noise_multiplier'))}, q = "
                         f"{_fmt_num(led.get('sample_rate'))}, "
                         f"steps = {led.get('steps')}")
            for w in dict.fromkeys(led.get("warnings", []) or []):
                lines.append(f"- ⚠ {w}")
        if info["grid"]:
            lines += ["", f"![samples of {info['run']}]({info['grid']})"]
        lines.append("")
    lines += _tables(rep)
    lines += ["", "## What ε covers", "", rep["privacy_scope"], "",
              "## Selection on private data", "", rep["selection_on_private_data"], ""]
    return "\n".join(lines)
