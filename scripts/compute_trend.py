"""Accuracy vs compute: the quickstart's plans side by side (issue 12's trend toward the papers).

    .venv/bin/python scripts/compute_trend.py runs/quickstart runs/long [--out docs/images/quickstart-compute-trend.png]
        [--minutes 33.9 74.7]   # end-to-end minutes of runs resumed before their reports timed every invocation

Reads each run's report/report.json (written by `dpldm quickstart`), prints a markdown table (end-to-end minutes,
DP steps, synthetic images, downstream accuracy per ε and of the ε = 0 rows) and plots accuracy against the
end-to-end minutes, one line per ε, with the zero-cost rows and DP-SGD as reference marks.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def summary(run: Path) -> dict:
    rep = json.loads((run / "report" / "report.json").read_text())
    rows = rep["rows"]
    loda = {round(r["epsilon"]): r for r in rows if r["method"].startswith("dpldm DP-LoDA")}
    pick = lambda prefix: next((r for r in rows if r["method"].startswith(prefix)), {})  # noqa: E731
    sgd = {round(r["epsilon"]): r["acc_mean"] for r in rows if r["method"].startswith("DP-SGD")}
    sizes = rep["set_sizes"]     # a resumed run's report has its total over every invocation too
    return {"run": str(run), "minutes": sizes.get("timings_all_s", sizes["timings_s"])["total"] / 60,
            "dp_steps": max(r["steps"] for r in loda.values()), "synthetic": rep["set_sizes"]["synthetic_per_run"],
            "acc": {eps: r["acc_mean"] for eps, r in loda.items()},
            "std": {eps: r.get("acc_std") or 0.0 for eps, r in loda.items()},
            "pretrained": pick("pretrained only").get("acc_mean"), "public": pick("CNN on the public").get("acc_mean"),
            "dpsgd": sgd}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="quickstart output folders (--out), smallest plan first")
    ap.add_argument("--out", type=Path, default=Path("docs/images/quickstart-compute-trend.png"))
    ap.add_argument("--minutes", type=float, nargs="+", metavar="M",
                    help="end-to-end minutes per run, in the runs' order: for a run resumed before its report timed "
                         "every invocation (the quickstart's timings.json), whose report times only the last one")
    args = ap.parse_args()
    rows = [summary(r) for r in args.runs]
    if args.minutes:
        if len(args.minutes) != len(rows):
            ap.error(f"--minutes: {len(args.minutes)} values for {len(rows)} runs")
        for row, minutes in zip(rows, args.minutes):
            row["minutes"] = minutes
    epsilons = sorted({e for r in rows for e in r["acc"]}, reverse=True)
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    print("| run | minutes | DP steps | synthetic images | " + " | ".join(f"ε = {e}" for e in epsilons)
          + " | pretrained only (ε = 0) | CNN on the public glyphs (ε = 0) |")
    print("|---|---:|---:|---:|" + "---:|" * (len(epsilons) + 2))
    for r in rows:
        accs = " | ".join(f"{pct(r['acc'].get(e))} ± {100 * r['std'].get(e, 0):.1f}" for e in epsilons)
        print(f"| {r['run']} | {r['minutes']:.1f} | {r['dp_steps']} | {r['synthetic']:,} | {accs} | "
              f"{pct(r['pretrained'])} | {pct(r['public'])} |")
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["minutes"] for r in rows]
    for e, colour in zip(epsilons, ("tab:blue", "tab:orange", "tab:green")):
        ax.errorbar(x, [100 * r["acc"][e] for r in rows], yerr=[100 * r["std"][e] for r in rows], marker="o",
                    color=colour, capsize=3, label=f"DP-LoDA synthetic data, ε = {e}")
        ax.plot(x, [100 * r["dpsgd"][e] for r in rows if e in r["dpsgd"]], ls=":", marker="x", color=colour,
                label=f"DP-SGD on the private data, ε = {e}")
    ax.plot(x, [100 * r["public"] for r in rows], ls="--", marker="s", color="gray",
            label="CNN on the public glyphs (ε = 0)")
    ax.plot(x, [100 * r["pretrained"] for r in rows], ls="--", marker="^", color="black",
            label="pretrained generator only (ε = 0)")
    ax.axhline(95.0, color="tab:red", lw=0.8, label="DP-LoDA paper, ε = 10 (GPUs)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(x)
    ax.set_xlabel("end-to-end minutes on 2 CPU cores (make demo = full plan)")
    ax.set_ylabel("accuracy on real MNIST test (%)")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
