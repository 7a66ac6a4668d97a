"""`dpldm evaluate RUN... --real-test SHARDS [--real-train SHARDS --baselines]`: downstream accuracy
(train on each run's synthetic shards, test on real), FID against the real test set, optional No-DP
and DP-SGD baselines on the real private data, and a report (default: first RUN/report/).

Synthetic images are converted to the real test set's channels and resolution before training,
so a 32×32 RGB model's samples are judged on 28×28 gray MNIST as the classifier will see them.
With --baselines, each of the `seeds` DP-SGD classifiers is its own private training on the real data (secret
seed each): the row shows their mean at one ε, and the report's total privacy cost counts every one of them.
"""
from __future__ import annotations

import math
from pathlib import Path

from dpldm.config import EvalConfig, load_config
from dpldm.errors import DpldmError
from dpldm.eval.classifier import accuracy, evaluate_synthetic
from dpldm.eval.dpsgd_baseline import DEFAULTS, train_dpsgd_classifier
from dpldm.eval.fid import fid_against_reference
from dpldm.eval.report import read_ledger, row_from_ledger, write_report
from dpldm.eval.shards import load_shards
from dpldm.log import log
from dpldm.run_dir import RunDir

FID_MAX_IMAGES = 500   # ~5 img/s through Inception on a CPU; set sizes are stated in the report


def _eval_config(run: Path) -> EvalConfig:
    cfg_path = RunDir(run).config
    return load_config(cfg_path).eval if cfg_path.is_file() else EvalConfig()


def _method_name(run: Path, ledger: dict) -> str:
    cfg_path = RunDir(run).config
    kind = f" {load_config(cfg_path).adapter.kind}" if cfg_path.is_file() else ""
    return f"dpldm{kind} ({run.name})" if ledger.get("private", False) else f"dpldm{kind} ({run.name}, no DP)"


def main(args) -> int:
    runs = [Path(r) for r in args.runs]
    for r in runs:
        if not (r / "samples" / "shards").is_dir():
            raise DpldmError(f"evaluate: {r}/samples/shards not found; run `dpldm sample {r}` first")
    ecfg = _eval_config(runs[0])
    arch = args.classifier or ecfg.classifier
    seeds = args.seeds if args.seeds is not None else ecfg.seeds
    epochs = args.epochs if args.epochs is not None else ecfg.epochs
    augment = args.augment or ecfg.augment
    smoothing = args.label_smoothing if args.label_smoothing is not None else ecfg.label_smoothing
    do_fid = ecfg.fid and not args.no_fid
    out = Path(args.out) if args.out else runs[0] / "report"

    x_test, y_test = load_shards(args.real_test)
    channels, resolution = x_test.shape[1], x_test.shape[-1]
    log(f"evaluate: real test set: {len(x_test)} images, {channels}×{resolution}×{resolution}", err=True)
    rows, sizes = [], {"real test": len(x_test)}
    for run in runs:
        ledger = read_ledger(run)
        x_syn, y_syn = load_shards(str(run / "samples" / "shards"), channels=channels, resolution=resolution)
        log(f"evaluate: {run}: {len(x_syn)} synthetic images; training {seeds}× {arch} for {epochs} epochs"
            f"{'' if augment == 'none' else f' on {augment} views'}"
            f"{f', label smoothing {smoothing:g}' if smoothing else ''}", err=True)
        acc = evaluate_synthetic(x_syn, y_syn, x_test, y_test, arch, epochs, seeds, verbose=True, augment=augment,
                                 label_smoothing=smoothing)
        fid = None
        if do_fid:
            n = min(len(x_syn), len(x_test), FID_MAX_IMAGES)
            fid = fid_against_reference(x_syn[:n], args.real_test, ecfg.inception, out / "fid_cache", n,
                                        verbose=True)
            sizes[f"FID {run.name}"] = f"{n} synthetic vs {n} real"
        sizes[f"synthetic {run.name}"] = len(x_syn)
        rows.append(row_from_ledger(_method_name(run, ledger), ledger, acc, fid, run=str(run)))

    if args.baselines:
        if not args.real_train:
            raise DpldmError("evaluate: --baselines needs --real-train SHARDS (the real private training data)")
        rows += _baselines(args.real_train, rows, x_test, y_test, arch, epochs, seeds, sizes, smoothing)
    note = ("dpldm evaluate selected nothing: every run passed on the command line is reported, scored on the "
            "real test set (not the private training data).")
    if args.baselines:
        note += (" The No-DP and DP-SGD baselines train on the real private data; their hyper-parameters are "
                 "fixed defaults tuned on public data (docs/evaluation.md). Each DP-SGD seed is a separate private "
                 "training: the total privacy cost counts all of them.")
    write_report(out, rows, runs=runs, selection_note=note, set_sizes=sizes)
    for r in rows:
        eps = "∞" if not math.isfinite(r["epsilon"]) else f"{r['epsilon']:.3g}"
        fid = f"  FID {r['fid']:.1f}" if r.get("fid") is not None else ""
        log(f"{r['method']}: eps {eps}  accuracy {100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}%{fid}")
    log(f"report: {out / 'report.md'}")
    return 0


def _baselines(real_train: str, rows: list[dict], x_test, y_test, arch: str, epochs: int, seeds: int,
               sizes: dict, label_smoothing: float = 0.0) -> list[dict]:
    """No-DP classifier on the real private data, and opacus DP-SGD at each private run's (ε, δ) with the
    synthetic classifiers' label smoothing (it helps DP-SGD too on public data: docs/results.md, round 13)."""
    x_tr, y_tr = load_shards(real_train, channels=x_test.shape[1], resolution=x_test.shape[-1])
    sizes["real private train"] = len(x_tr)
    log(f"evaluate: No-DP baseline on {len(x_tr)} real private images", err=True)
    nodp = evaluate_synthetic(x_tr, y_tr, x_test, y_test, arch, epochs, seeds, verbose=True)
    out = [row_from_ledger("No DP (real data)", {"private": False, "sampling": "shuffle"}, nodp,
                           notes="classifier trained on the private data without DP")]
    budgets = sorted({(r["epsilon"], r["delta"]) for r in rows if r.get("private") and r.get("delta")})
    for eps, delta in budgets:
        accs, ledgers = [], []
        batch = min(DEFAULTS["expected_batch_size"], len(x_tr) // 2)
        for seed in range(seeds):
            model, ledger = train_dpsgd_classifier(x_tr, y_tr, target_epsilon=eps, delta=delta,  # secret seed
                                                   expected_batch_size=batch,
                                                   num_classes=int(max(y_tr.max(), y_test.max())) + 1, verbose=True,
                                                   label_smoothing=label_smoothing)
            accs.append(accuracy(model, x_test, y_test))
            ledgers.append(ledger)
            log(f"evaluate: DP-SGD eps={eps:.3g} model {seed + 1}/{seeds}: accuracy {accs[-1]:.4f} "
                f"({ledger['seconds']:.0f} s)", err=True)
        mean = sum(accs) / len(accs)
        std = (sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5 if len(accs) > 1 else 0.0
        # each of the `seeds` models is a separate private training on the real data: the total counts all
        res = {"mean": mean, "std": std, "runs": accs, "label_smoothing": label_smoothing}
        out.append(row_from_ledger("DP-SGD classifier (opacus)", ledger, res,
                                   notes=f"σ={ledger['noise_multiplier']:.2f}, q={ledger['sample_rate']:.3g}, "
                                         f"{ledger['steps']} steps, C={ledger['max_grad_norm']}", ledgers=ledgers))
    if not budgets:
        log("evaluate: no private run given: DP-SGD baseline skipped (it needs a target ε, δ)", err=True)
    return out
