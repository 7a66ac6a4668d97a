"""fp32 against bf16 sampling from one public generator, scored on public test sets only (docs/results.md, round 7).

    .venv/bin/python scripts/precision_fidelity.py runs/quickstart/public-glyphs/pipeline --n 10000 --seeds 2

Samples n class-balanced images twice from the same seeds (the quickstart's sampler: 4 DPM-Solver++ steps, no
guidance), prints their pixel difference, writes both through the quickstart's shard path and trains the
quickstart's CNN on each (5 x 30,000 / n epochs: the quickstart's number of steps), tested on held-out glyphs and
scikit-learn's real digits. No private data is read.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dpldm.data.pack import pack
from dpldm.eval.classifier import accuracy, train_classifier
from dpldm.eval.shards import load_shards
from dpldm.sample import generate, load_run, plan_prompts, write_outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pipeline", help="a public pipeline folder or run")
    ap.add_argument("--out", default="runs/precision-fidelity")
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    tests = {}
    for name, source in (("held-out glyphs", "glyphs:digits"), ("scikit-learn digits", "digits")):
        folder = out / f"{source.replace(':', '-')}-test"
        pack(source, folder, split="test", limit=5000 if source.startswith("glyphs") else 0, shard_size=10000,
             verbose=False)
        tests[name] = load_shards(str(folder), channels=1, resolution=28)
    run = load_run(args.pipeline)
    prompts, labels = plan_prompts(run.meta, run.cfg, args.n, None, None, None)
    images = {p: generate(run.comps, prompts, list(range(args.n)), guidance=1.0, steps=4, scheduler="dpm++", seed=0,
                          batch_size=250, resolution=32, precision=p) for p in ("fp32", "bf16")}
    d = (images["fp32"] - images["bf16"]).abs()
    print(f"pixel difference bf16 - fp32: mean {float(d.mean()):.4f}, max {float(d.max()):.3f}")
    for p, x in images.items():
        write_outputs(x, list(range(args.n)), prompts, labels, out / p)
        xs, ys = load_shards(str(out / p / "shards"), channels=1, resolution=28)
        for seed in range(args.seeds):
            model = train_classifier(xs, ys, epochs=max(1, round(5 * 30000 / args.n)), seed=seed, num_classes=10)
            scores = ", ".join(f"{k} {100 * accuracy(model, *t):.1f}%" for k, t in tests.items())
            print(f"{p} seed {seed}: {scores}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
