"""How many images and classifier steps the downstream protocol needs, measured on public data only.

    .venv/bin/python scripts/downstream_protocol.py [--out runs/protocol]

Trains the quickstart's downstream CNN on N *real* public glyphs (glyphs:digits, the quickstart's public set)
for E epochs and tests it on held-out glyphs and on scikit-learn's real digits (public). Whatever a synthetic
set teaches under a protocol, real data of its kind teaches at least as much: the protocol is fixed where this
curve flattens (docs/results.md), never by looking at the private test set. One torch thread, seed 0.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dpldm.data.pack import pack
from dpldm.eval.classifier import evaluate_synthetic
from dpldm.eval.shards import load_shards

GRID = [(2000, 5), (2000, 20), (5000, 5), (10000, 5), (10000, 10), (20000, 5)]   # (images, epochs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/protocol")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    sets = {"train": ("glyphs:digits", "train", 20000), "test": ("glyphs:digits", "test", 5000),
            "digits": ("digits", "test", 0)}
    for name, (source, split, limit) in sets.items():
        pack(source, out / name, split=split, limit=limit, shard_size=10000)
    x, y = load_shards(str(out / "train"), channels=1, resolution=28)
    tests = {name: load_shards(str(out / name), channels=1, resolution=28) for name in ("test", "digits")}
    print("| images | epochs | CNN steps (batch 128) | held-out glyphs | scikit-learn digits test | s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, epochs in GRID:
        t0 = time.time()
        acc = {k: evaluate_synthetic(x[:n], y[:n], xt, yt, epochs=epochs, seeds=1)["mean"]
               for k, (xt, yt) in tests.items()}
        print(f"| {n} | {epochs} | {epochs * -(-n // 128)} | {100 * acc['test']:.1f}% | {100 * acc['digits']:.1f}% "
              f"| {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
