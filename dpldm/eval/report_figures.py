"""The report's figures: the privacy–utility plot and sample grids labelled by class.

    plot_privacy_utility(rows, Path("report/privacy_utility.png"))
    class_grid(Path("runs/eps10"), Path("report/grids/eps10.png"))   # rows = classes, named

Plot: accuracy vs ε on a log axis per method (published paper figures as crosses); rows with ε = 0 (no private
data: the pretrained model, a classifier on public data) and rows with no DP (ε = ∞) cannot sit on a log axis,
so they are drawn as horizontal reference lines across it (dotted / dashed), labelled with their ε.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure   # the object API: no pyplot, no global backend to choose
from PIL import Image

from dpldm.config import load_config
from dpldm.errors import DpldmError
from dpldm.eval.total_cost import has_explicit_seed, row_kind
from dpldm.run_dir import RunDir

GRID_PER_CLASS = 10       # samples shown per class row
GRID_MAX_CLASSES = 20     # classes shown (the first ones) in one grid
REFERENCE_COLOURS = ("tab:green", "tab:olive", "tab:cyan", "darkgreen", "tab:brown")


def _legend_name(row: dict, suffix: str) -> str:
    """method + suffix, unless the method already says it (no "DP-LDM (paper) (paper)")."""
    m = row["method"]
    return m if suffix.strip(" ()").lower() in m.lower() else f"{m} {suffix}"


def plot_privacy_utility(rows: list[dict], path: Path) -> list[str]:
    """Accuracy vs ε (log x); ε = 0 and ε = ∞ rows as reference lines. Returns the legend's labels ([], and no
    file, when fewer than 2 rows have an accuracy)."""
    pts = [r for r in rows if r.get("acc_mean") is not None and r.get("epsilon") is not None]
    if len(pts) < 2:
        return []
    fig = Figure(figsize=(9.5, 4.5))
    ax = fig.subplots()
    finite = [r for r in pts if row_kind(r) in ("private", "paper") and float(r["epsilon"]) > 0]
    for m in dict.fromkeys(r["method"] for r in finite):
        rs = sorted((r for r in finite if r["method"] == m), key=lambda r: float(r["epsilon"]))
        paper = any(r.get("paper") for r in rs)
        flagged = any(has_explicit_seed(r) for r in rs)
        label = _legend_name(rs[0], "(paper)") if paper else m + (" ⚠ explicit seed" if flagged else "")
        ax.errorbar([float(r["epsilon"]) for r in rs], [100 * r["acc_mean"] for r in rs],
                    yerr=[100 * (r.get("acc_std") or 0) for r in rs], capsize=3, fmt="x" if paper else "o-",
                    label=label)
    refs = [r for r in pts if row_kind(r) in ("no_private_data", "not_private")]
    for i, r in enumerate(refs):
        zero = row_kind(r) == "no_private_data"
        ax.axhline(100 * r["acc_mean"], ls=":" if zero else "--", lw=1.5 if zero else 1,
                   color=REFERENCE_COLOURS[i % len(REFERENCE_COLOURS)] if zero else "gray",
                   label=f"{r['method']} (ε = 0)" if zero else
                   f"{r['method']} ({'' if 'no dp' in r['method'].lower() else 'no DP, '}ε = ∞)")
    if finite:
        ax.set_xscale("log")
    else:
        ax.set_xticks([])
    ax.set_xlabel("ε (log scale; δ as in the table)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("privacy–utility (horizontal lines: ε = 0 and no-DP references)")
    ax.grid(alpha=0.3)
    legend = ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return [t.get_text() for t in legend.get_texts()]


def class_labels_of(run: Path) -> tuple[list[str], bool]:
    """(public class names for a run's samples, whether they are the pretrained pipeline's prompts): the run
    config's model.class_names, else the pretrained pipeline's (dpldm.json; then private label k was trained
    with the pipeline's k-th prompt). Never classes.json, which may be derived from the private labels."""
    cfg_file = RunDir(run).config
    try:
        cfg = load_config(cfg_file) if cfg_file.is_file() else None
    except DpldmError:                      # a config this version cannot read: label rows by class index
        cfg = None
    if cfg is None:
        return [], False
    if cfg.model.class_names:
        return list(cfg.model.class_names), False
    meta = Path(cfg.model.pretrained or "") / "dpldm.json"
    if cfg.model.pretrained and meta.is_file():
        return list(json.loads(meta.read_text()).get("class_names") or []), True
    return [], False


def _row_label(k: int, names: list[str], pipeline: bool) -> str:
    if k >= len(names):
        return f"class {k}"
    return f"{k} (prompt: {names[k]})" if pipeline else f"{k} · {names[k]}"


def class_grid(run: Path, dst: Path) -> bool:
    """A grid of the run's samples with one row per class, labelled "k · name"; False when the samples carry
    no class labels (text prompts) or their images are missing."""
    meta_file, images = RunDir(run).samples_meta, run / "samples" / "images"
    if not meta_file.is_file() or not images.is_dir():
        return False
    labels = json.loads(meta_file.read_text()).get("labels") or []
    by_class: dict[int, list[Path]] = {}
    for i, k in enumerate(labels):
        f = images / f"{i:06d}.png"
        if k is not None and k >= 0 and f.is_file() and len(by_class.setdefault(k, [])) < GRID_PER_CLASS:
            by_class[k].append(f)
    if not by_class:
        return False
    classes = sorted(by_class)[:GRID_MAX_CLASSES]
    names, pipeline = class_labels_of(run)
    first = np.asarray(Image.open(by_class[classes[0]][0]).convert("RGB"))
    h, w, pad = first.shape[0], first.shape[1], 2
    cols = max(len(by_class[k]) for k in classes)
    canvas = np.full(((h + pad) * len(classes) + pad, (w + pad) * cols + pad, 3), 255, dtype=np.uint8)
    for row, k in enumerate(classes):
        for col, f in enumerate(by_class[k]):
            img = np.asarray(Image.open(f).convert("RGB").resize((w, h)))
            y, x = pad + row * (h + pad), pad + col * (w + pad)
            canvas[y:y + h, x:x + w] = img
    fig = Figure(figsize=(0.5 * cols, 0.3 + 0.5 * len(classes)))
    ax = fig.subplots()
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(len(classes))])
    ax.set_yticklabels([_row_label(k, names, pipeline) for k in classes], fontsize=8)
    ax.set_xticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    more = f" (first {GRID_MAX_CLASSES} of {len(by_class)} classes)" if len(by_class) > GRID_MAX_CLASSES else ""
    ax.set_title(f"{run.name}: samples by class{more}", fontsize=9)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dst, dpi=110, bbox_inches="tight")
    return True


def grid_for(run: Path, out: Path) -> str | None:
    """The run's class-labelled grid (or its plain samples/grid.png) under out/grids/; path relative to out."""
    dst = out / "grids" / f"{run.name}.png"
    if not class_grid(run, dst):
        src = run / "samples" / "grid.png"
        if not src.is_file():
            return None
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return str(dst.relative_to(out))
