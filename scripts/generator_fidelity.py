"""How well the public generator reproduces its public data, per pretraining budget (public data only).

    .venv/bin/python scripts/generator_fidelity.py --out runs/fidelity --unet-steps 800 1600 2400
    .venv/bin/python scripts/generator_fidelity.py --out runs/fid-cos --unet-steps 1600 --set optim.decay=cosine
    .venv/bin/python scripts/generator_fidelity.py --out runs/fidelity --unet-steps 2400 --samples 10000 30000

Pretrains the quickstart's autoencoder and latent U-Net on the public glyphs (glyphs:digits) with each U-Net
budget in turn (ascending: each budget resumes the previous one's checkpoint; the learning rate is constant, so
this is the run a fresh budget would make), samples the quickstart's number of images from the pretrained model
alone (label-index prompts, the quickstart's sampler steps and guidance) and trains the quickstart's downstream
CNN on them (its protocol: synthetic_n images x clf_epochs). Tested on held-out glyphs and scikit-learn's real
digits, beside the same CNN on as many *real* glyphs: the gap between the two is the generator's fidelity gap
(issue 12 §5). `--samples N ...` scores several synthetic set sizes: one sample set of the largest size, and a
class-balanced prefix (the first N/10 of each label) for each smaller one. No private data is read.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from dpldm.config import apply_mapping, load_config
from dpldm.data.pack import pack
from dpldm.eval.classifier import accuracy, train_classifier
from dpldm.eval.shards import load_shards
from dpldm.recipes.quickstart import CONFIGS, FULL, _pretrained_only_run, pack_sets, pretrain_public, sampled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/fidelity")
    ap.add_argument("--unet-steps", type=int, nargs="+", default=[800, 1600])
    ap.add_argument("--guidance", type=float, default=None, help="default: configs/quickstart.yaml's")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides of the U-Net pretraining (configs/pretrain_glyphs.yaml), e.g. optim.lr=2e-3; "
                         "use a fresh --out per setting")
    ap.add_argument("--samples", type=int, nargs="+", default=[FULL.synthetic_n],
                    help="synthetic (and real) set sizes to score, each a multiple of 10")
    args = ap.parse_args()
    if args.set and len(args.unet_steps) > 1:   # e.g. a cosine decay depends on the total: no resuming a shorter run
        ap.error("--set measures one --unet-steps budget per --out")
    out = Path(args.out)
    data = pack_sets(out, FULL, ("glyphs",))
    tests = {}
    for name, source in (("held-out glyphs", "glyphs:digits"), ("scikit-learn digits", "digits")):
        folder = out / "data" / f"{source.replace(':', '-')}-test"
        pack(source, folder, split="test", limit=5000 if source.startswith("glyphs") else 0, shard_size=10000)
        tests[name] = load_shards(str(folder), channels=1, resolution=28)
    sizes, epochs = sorted(args.samples), FULL.clf_epochs
    x_pub, y_pub = load_shards(str(data["glyphs"]), channels=1, resolution=28)
    if sizes[-1] > len(x_pub) or any(n % 10 for n in sizes):
        ap.error(f"--samples: multiples of 10 up to the {len(x_pub)} public glyphs")
    def score(x, y):   # one CNN (seed 0, the quickstart's protocol), tested on each test set
        model = train_classifier(x, y, epochs=epochs, seed=0, num_classes=10)
        return {k: accuracy(model, xt, yt) for k, (xt, yt) in tests.items()}

    real = {n: score(*balanced(x_pub, y_pub, n)) for n in sizes}
    print(f"| U-Net steps | images | {' | '.join(tests)} | gap to as many real glyphs | s |\n|---:|---:|"
          + "---:|" * (len(tests) + 2))
    for n in sizes:
        print(f"| real glyphs | {n} | {' | '.join(f'{100 * v:.1f}%' for v in real[n].values())} | 0 | – |", flush=True)
    for steps in sorted(args.unet_steps):
        t0 = time.time()
        plan = dataclasses.replace(FULL, unet_steps=steps)
        pipeline = pretrain_public(out, data, plan, unet_overrides=tuple(args.set))
        cfg = apply_mapping(load_config(CONFIGS / "quickstart.yaml"), {
            "model.pretrained": str(pipeline), "sample.steps": plan.sample_steps, "output.dir": str(out / "unused")})
        settings = {"guidance": args.guidance} if args.guidance is not None else {}
        suffix = "" if sizes[-1] == FULL.synthetic_n else f"-n{sizes[-1]}"
        shards = sampled(_pretrained_only_run(out, cfg), sizes[-1], out / f"samples-unet{steps}{suffix}", **settings)
        x_syn, y_syn = load_shards(str(shards), channels=1, resolution=28)
        for n in sizes:
            acc = score(*balanced(x_syn, y_syn, n))
            gap = 100 * (acc["held-out glyphs"] - real[n]["held-out glyphs"])
            print(f"| {steps} | {n} | {' | '.join(f'{100 * v:.1f}%' for v in acc.values())} | {gap:+.1f} "
                  f"| {time.time() - t0:.0f} |", flush=True)


def balanced(x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n/10 images of each label 0-9 (a class-balanced prefix of a class-balanced set)."""
    idx = torch.cat([torch.nonzero(y == c).flatten()[:n // 10] for c in range(10)])
    if len(idx) < n:
        raise SystemExit(f"generator_fidelity: fewer than {n // 10} images of some label in a set of {len(y)}")
    return x[idx], y[idx]


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
