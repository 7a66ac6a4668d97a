"""Evaluation reports: report.json + report.md with sample grids, the results table, each run's
privacy ledger (loud NOT PRIVATE marking) and a privacy–utility plot.

    rows = [row_from_ledger("DP-LDM (loda)", read_ledger(run), acc, fid), ...]
    write_report("runs/x/report", rows, runs=["runs/x"], paper_rows=[...], selection_note="...")

A row is a dict: method, epsilon, delta, accountant, sampling, private, acc_mean, acc_std, acc_runs,
fid, fid_n, notes, warnings, run (all optional but method).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from dpldm.errors import DpldmError

PRIVACY_SCOPE = ("The (ε, δ) guarantee covers the private fine-tuning data only: each private example's "
                 "influence on the released model and samples is bounded. It says nothing about the public "
                 "data the autoencoder and U-Net were pretrained on, nor about the real test set used here.")
SELECTION_DEFAULT = ("Not declared. Any checkpoint, hyper-parameter or run chosen by a metric computed on "
                     "private data is itself a release not covered by ε (DESIGN invariant 6); state it here.")


def read_ledger(run_dir: str | Path) -> dict:
    """The run's privacy.json as a dict (DpldmError naming the file when missing or invalid)."""
    path = Path(run_dir) / "privacy.json"
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
                    run: str = "", notes: str = "") -> dict:
    """One table row from a ledger, an evaluate_synthetic result and a FID result."""
    private = is_private(ledger)
    row = {
        "method": method, "run": run, "private": private,
        "epsilon": float(ledger["epsilon"]) if private else math.inf,
        "delta": ledger.get("delta"), "accountant": ledger.get("accountant", ""),
        "sampling": ledger.get("sampling", ""), "noise_multiplier": ledger.get("noise_multiplier"),
        "sample_rate": ledger.get("sample_rate"), "steps": ledger.get("steps"),
        "warnings": list(ledger.get("warnings", []) or []), "notes": notes,
    }
    if acc:
        row.update(acc_mean=acc["mean"], acc_std=acc["std"], acc_runs=acc.get("runs", []),
                   n_train=acc.get("n_train"), n_test=acc.get("n_test"))
    if fid:
        row.update(fid=fid["fid"], fid_n=fid.get("n_fake"))
    return row


def _fmt_eps(e) -> str:
    if e is None:
        return "–"
    return "∞ (no DP)" if not math.isfinite(float(e)) else f"{float(e):.3g}"


def _fmt_acc(r: dict) -> str:
    if r.get("acc_mean") is None:
        return "–"
    s = f"{100 * r['acc_mean']:.1f}"
    return s + (f" ± {100 * r['acc_std']:.1f}" if r.get("acc_std") else "")


def _copy_grid(run: Path, out: Path) -> str | None:
    src = run / "samples" / "grid.png"
    if not src.is_file():
        return None
    dst = out / "grids" / f"{run.name}.png"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return str(dst.relative_to(out))


def plot_privacy_utility(rows: list[dict], path: Path) -> bool:
    """Accuracy vs ε (log x) per method; non-private rows as dashed lines. False if < 2 points."""
    pts = [r for r in rows if r.get("acc_mean") is not None and r.get("epsilon") is not None]
    if len(pts) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    finite = [r for r in pts if math.isfinite(float(r["epsilon"]))]
    methods = list(dict.fromkeys(r["method"] for r in finite))
    for m in methods:
        rs = sorted((r for r in finite if r["method"] == m), key=lambda r: float(r["epsilon"]))
        paper = any(r.get("paper") for r in rs)
        ax.errorbar([float(r["epsilon"]) for r in rs], [100 * r["acc_mean"] for r in rs],
                    yerr=[100 * (r.get("acc_std") or 0) for r in rs], capsize=3,
                    fmt="x" if paper else "o-", label=f"{m} (paper)" if paper else m)
    for r in pts:
        if not math.isfinite(float(r["epsilon"])):
            ax.axhline(100 * r["acc_mean"], ls="--", lw=1, color="gray", label=f"{r['method']} (no DP)")
    if finite:
        ax.set_xscale("log")
    ax.set_xlabel("ε (δ as in the table)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("privacy–utility")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


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
                         "grid": _copy_grid(run, out)})
    paper_rows = [dict(r, paper=True, notes=r.get("notes", "published")) for r in (paper_rows or [])]
    all_rows = list(rows) + paper_rows
    plot = "privacy_utility.png" if plot_privacy_utility(all_rows, out / "privacy_utility.png") else None
    not_private = [r for r in rows if r.get("private") is False] + [i for i in run_info if not i["private"]]
    report = {
        "title": title, "rows": rows, "paper_rows": paper_rows, "runs": run_info, "plot": plot,
        "privacy_scope": PRIVACY_SCOPE,
        "selection_on_private_data": selection_note or SELECTION_DEFAULT,
        "set_sizes": set_sizes or {}, "discussion": discussion, "not_private": sorted({str(r.get("run") or r.get("method")) for r in not_private}),
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


def _markdown(rep: dict) -> str:
    lines = [f"# {rep['title']}", ""]
    for info in rep["runs"]:
        if not info["private"]:
            lines += [f"> **⚠ NOT PRIVATE: run `{info['run']}` has no finite ε (ledger private=false). "
                      "Its samples carry no differential-privacy guarantee.**", ""]
    lines += ["## Results", "", "| method | ε | δ | accountant | sampling | accuracy (%) mean ± std | FID (n) | notes |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"] + rep["paper_rows"]:
        fid = f"{r['fid']:.1f} ({r.get('fid_n', '?')})" if r.get("fid") is not None else "–"
        notes = "; ".join(x for x in [("**NOT PRIVATE**" if r.get("private") is False else ""), r.get("notes", ""),
                                      *r.get("warnings", [])] if x)
        lines.append(f"| {r['method']} | {_fmt_eps(r.get('epsilon'))} | {r.get('delta') if r.get('delta') is not None else '–'} "
                     f"| {r.get('accountant') or '–'} | {r.get('sampling') or '–'} | {_fmt_acc(r)} | {fid} | {notes} |")
    if rep["set_sizes"]:
        lines += ["", "Set sizes: " + ", ".join(f"{k} = {v}" for k, v in rep["set_sizes"].items())
                  + ". FID on fewer than 10k images is biased upward: compare only at equal sizes."]
    if rep.get("discussion"):
        lines += ["", "## Reading the results", "", rep["discussion"]]
    if rep["plot"]:
        lines += ["", "## Privacy–utility", "", f"![accuracy vs epsilon]({rep['plot']})"]
    lines += ["", "## Runs", ""]
    for info in rep["runs"]:
        led = info["ledger"]
        status = "private" if info["private"] else "**NOT PRIVATE**"
        lines.append(f"### `{info['run']}` ({status})")
        lines.append("")
        lines.append(f"ε = {_fmt_eps(led.get('epsilon'))}, δ = {led.get('delta')}, accountant = {led.get('accountant')}, "
                     f"sampling = {led.get('sampling')}, σ = {led.get('noise_multiplier')}, q = {led.get('sample_rate')}, "
                     f"steps = {led.get('steps')}")
        for w in led.get("warnings", []) or []:
            lines.append(f"- ⚠ {w}")
        if info["grid"]:
            lines += ["", f"![samples of {info['run']}]({info['grid']})"]
        lines.append("")
    lines += ["## What ε covers", "", rep["privacy_scope"], "",
              "## Selection on private data", "", rep["selection_on_private_data"], ""]
    return "\n".join(lines)
