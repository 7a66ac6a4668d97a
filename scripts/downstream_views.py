"""Whether the downstream classifier should train on random affine views (and with smoothed labels), measured on
public data only.

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

`--label-smoothing 0.1` adds a protocol to each: views with smoothed labels for the sets, the recipe as it is with
smoothed labels for DP-SGD (round 13 of docs/results.md). `--mix-public SHARDS` adds, for each set, views on the set
plus as many images drawn from SHARDS (e.g. the public glyphs) at half the epochs, so the same optimizer steps
(round 13: measured, not adopted). `--first-seed` shifts the classifiers' seeds.
"""
from __future__ import annotations

import argparse
import time

import torch

from dpldm.eval.classifier import accuracy, evaluate_synthetic
from dpldm.eval.dpsgd_baseline import train_dpsgd_classifier
from dpldm.eval.shards import load_shards


def cell(res: dict) -> str:
    return f"{100 * res['mean']:.1f}% ± {100 * res['std']:.1f} ({', '.join(f'{100 * r:.1f}' for r in res['runs'])})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sets", nargs="*", help="shard folders of labelled images (28×28 gray after loading)")
    ap.add_argument("--dpsgd", default="", help="a public labelled set to train the DP-SGD baseline on, both ways")
    ap.add_argument("--test", required=True, help="a public test set's shards (e.g. the proxy's digits-test)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--label-smoothing", type=float, default=0.0, help="also this label smoothing (0: not tried)")
    ap.add_argument("--mix-public", default="", help="also train on each set + as many of these images")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ls = args.label_smoothing
    protocols = [("none", 0.0), ("affine", 0.0)] + ([("affine", ls)] if ls else [])       # (views, label smoothing)
    label = lambda a, s: a + (f" + label smoothing {s:g}" if s else "")                # noqa: E731
    xt, yt = load_shards(args.test, channels=1, resolution=28)
    mix = args.mix_public and load_shards(args.mix_public, channels=1, resolution=28)
    mixed = ["affine + as many public images"] if mix else []
    print("| set | images | epochs | " + " | ".join(f"{h} (mean ± std)" for h in [label(*p) for p in protocols] + mixed)
          + " | s |")
    print("|---|---:|---:|" + "---:|" * (len(protocols) + len(mixed)) + "---:|")
    for path in args.sets:
        x, y = load_shards(path, channels=1, resolution=28)
        epochs = max(1, round(5 * 30000 / len(x)))
        t0, cells = time.time(), []
        for augment, smoothing in protocols:
            res = evaluate_synthetic(x, y, xt, yt, epochs=epochs, seeds=args.seeds, augment=augment,
                                     label_smoothing=smoothing, first_seed=args.first_seed)
            cells.append(cell(res))
        if mix:
            pick = torch.randperm(len(mix[0]), generator=torch.Generator().manual_seed(0))[:len(x)]
            res = evaluate_synthetic(torch.cat([x, mix[0][pick]]), torch.cat([y, mix[1][pick]]), xt, yt,
                                     epochs=max(1, round(epochs / 2)), seeds=args.seeds, augment="affine",
                                     first_seed=args.first_seed)
            cells.append(cell(res))
        print(f"| {path} | {len(x)} | {epochs} | {' | '.join(cells)} | {time.time() - t0:.0f} |", flush=True)
    if args.dpsgd:
        x, y = load_shards(args.dpsgd, channels=1, resolution=28)
        held = {"held-out": (x[-5000:], y[-5000:]), "--test": (xt, yt)}
        x, y = x[:-5000], y[:-5000]
        print(f"\nDP-SGD on {len(x)} images of {args.dpsgd} (3 epochs, batches of 1,000), tested on its last 5,000 "
              "(held-out) and on --test\n\n| ε | protocol | seed | held-out | --test |\n|---:|---|---:|---:|---:|")
        dpsgd_protocols = [("none", 0.0), ("affine", 0.0)] + ([("none", ls)] if ls else [])
        for eps in (1.0, 10.0):
            for augment, smoothing in dpsgd_protocols:
                for seed in range(args.first_seed, args.first_seed + 2):
                    model, _ = train_dpsgd_classifier(x, y, eps, 1e-5, epochs=3, expected_batch_size=1000, seed=seed,
                                                      augment=augment, label_smoothing=smoothing)
                    accs = " | ".join(f"{100 * accuracy(model, a, b):.1f}%" for a, b in held.values())
                    print(f"| {eps:g} | {label(augment, smoothing)} | {seed} | {accs} |", flush=True)


if __name__ == "__main__":
    main()
