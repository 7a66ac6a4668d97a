"""Whether the downstream classifier should train on random affine views, measured on public data only.

    .venv/bin/python scripts/downstream_views.py --test runs/quickstart/data/digits-test \
        runs/quickstart/proxy/quickstart-eps1/samples/shards [more sample shards or image sets ...]

Trains the quickstart's downstream CNN on each given set (DP fine-tunes' samples of the public proxy, the
pretrained generator's samples, the public glyphs), once on the images as they are and once on
`random_affine` views (eval.classifier.AFFINE), with the quickstart's number of optimizer steps (5 epochs of
30,000 images: 20 epochs of 7,500) and 3 seeds, and tests it on `--test`: the proxy's real scikit-learn digits,
never the private test set. One torch thread.
"""
from __future__ import annotations

import argparse
import time

import torch

from dpldm.eval.classifier import AUGMENTS, evaluate_synthetic
from dpldm.eval.shards import load_shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sets", nargs="+", help="shard folders of labelled images (28×28 gray after loading)")
    ap.add_argument("--test", required=True, help="a public test set's shards (e.g. the proxy's digits-test)")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    xt, yt = load_shards(args.test, channels=1, resolution=28)
    print("| set | images | epochs | " + " | ".join(f"{a} (mean ± std)" for a in AUGMENTS) + " | s |")
    print("|---|---:|---:|" + "---:|" * len(AUGMENTS) + "---:|")
    for path in args.sets:
        x, y = load_shards(path, channels=1, resolution=28)
        epochs = max(1, round(5 * 30000 / len(x)))
        t0, cells = time.time(), []
        for augment in AUGMENTS:
            res = evaluate_synthetic(x, y, xt, yt, epochs=epochs, seeds=args.seeds, augment=augment)
            cells.append(f"{100 * res['mean']:.1f}% ± {100 * res['std']:.1f} "
                         f"({', '.join(f'{100 * r:.1f}' for r in res['runs'])})")
        print(f"| {path} | {len(x)} | {epochs} | {' | '.join(cells)} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
