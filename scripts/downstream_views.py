"""Whether the downstream classifier should train on random affine views, measured on public data only.

    .venv/bin/python scripts/downstream_views.py --test runs/quickstart/data/digits-test \
        runs/quickstart/proxy/quickstart-eps1/samples/shards [more sample shards or image sets ...]

Trains the quickstart's downstream CNN on each given set (DP fine-tunes' samples of the public proxy, the
pretrained generator's samples, the public glyphs), once on the images as they are and once on
`random_affine` views (eval.classifier.AFFINE), with the quickstart's number of optimizer steps (5 epochs of
30,000 images: 20 epochs of 7,500) and 3 seeds, and tests it on `--test`: the proxy's real scikit-learn digits,
never the private test set. One torch thread.

    .venv/bin/python scripts/downstream_views.py --test runs/quickstart/data/digits-test \
        --dpsgd runs/quickstart/data/glyphs-digits-train

also trains the DP-SGD baseline (the quickstart's recipe: 3 epochs, Poisson batches of 1,000, ε = 1 and 10) with
and without the views on the public glyphs standing in for a private set (all but the last 5,000, which are its
same-distribution test set, as MNIST test is MNIST train's), 2 explicit seeds each: public data, no private data.
"""
from __future__ import annotations

import argparse
import time

import torch

from dpldm.eval.classifier import AUGMENTS, accuracy, evaluate_synthetic
from dpldm.eval.dpsgd_baseline import train_dpsgd_classifier
from dpldm.eval.shards import load_shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sets", nargs="*", help="shard folders of labelled images (28×28 gray after loading)")
    ap.add_argument("--dpsgd", default="", help="a public labelled set to train the DP-SGD baseline on, both ways")
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
    if args.dpsgd:
        x, y = load_shards(args.dpsgd, channels=1, resolution=28)
        held = {"held-out": (x[-5000:], y[-5000:]), "--test": (xt, yt)}
        x, y = x[:-5000], y[:-5000]
        print(f"\nDP-SGD on {len(x)} images of {args.dpsgd} (3 epochs, batches of 1,000), tested on its last 5,000 "
              "(held-out) and on --test\n\n| ε | views | seed | held-out | --test |\n|---:|---|---:|---:|---:|")
        for eps in (1.0, 10.0):
            for augment in AUGMENTS:
                for seed in range(2):
                    model, _ = train_dpsgd_classifier(x, y, eps, 1e-5, epochs=3, expected_batch_size=1000, seed=seed,
                                                      augment=augment)
                    accs = " | ".join(f"{100 * accuracy(model, a, b):.1f}%" for a, b in held.values())
                    print(f"| {eps:g} | {augment} | {seed} | {accs} |", flush=True)


if __name__ == "__main__":
    main()
