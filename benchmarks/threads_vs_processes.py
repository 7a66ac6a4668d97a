"""Threads or processes: throughput of the quickstart's workloads in one process using every core against
two concurrent processes sharing them (what dpldm/recipes/jobs.py does with independent jobs).

    .venv/bin/python benchmarks/threads_vs_processes.py [--steps 30]

Workloads, each on random inputs of the quickstart's shapes: "unet train" (the glyph config's 1.2M-parameter
latent U-Net, AdamW step on a batch of 64 8x8x4 latents with 16x384 conditioning), "classifier train" (the
downstream SmallCNN, Adam step on 128 28x28 images), "sampling" (a U-Net forward pass on 250 latents, no grad).
Each worker is a fresh process timing the median of --steps steps after a warm-up; "2 processes" runs two at
once with cpu_count // 2 threads each and sums their throughput. Prints a table and writes the "Threads or
processes" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_time, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("unet train", "classifier train", "sampling")


def worker(workload: str, threads: int, steps: int) -> None:
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if workload == "classifier train":
        from dpldm.eval.classifier import SmallCNN
        model, per = SmallCNN(), 128
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        x, y = torch.rand(per, 1, 28, 28), torch.randint(0, 10, (per,))

        def step():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    else:
        from dpldm.config import load_config
        from dpldm.models.pipeline import build_unet
        unet = build_unet(load_config(ROOT / "configs" / "pretrain_glyphs.yaml").model, 384, 8)
        per = 64 if workload == "unet train" else 250
        x, c, t = torch.randn(per, 4, 8, 8), torch.randn(per, 16, 384), torch.randint(0, 1000, (per,))
        opt = torch.optim.AdamW(unet.parameters(), 1e-3)

        def step():
            if workload == "sampling":
                with torch.no_grad():
                    unet(x, t, encoder_hidden_states=c)
                return
            loss = unet(x, t, encoder_hidden_states=c).sample.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(per / median_time(step, repeat=steps, warmup=3))


def measure(workload: str, threads: int, processes: int, steps: int) -> float:
    """Summed images/s of `processes` concurrent workers of `threads` threads each."""
    cmd = [sys.executable, __file__, "--worker", workload, "--threads", str(threads), "--steps", str(steps)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(processes)]
    return sum(float(p.communicate()[0].strip().splitlines()[-1]) for p in procs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--worker", choices=WORKLOADS)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.threads, args.steps)
    cores = os.cpu_count() or 1
    half = max(1, cores // 2)
    lines = [f"| workload | 1 process x {cores} threads | 1 process x {half} threads | 2 processes x {half} threads "
             "| 2 processes / 1 process |", "|---|---:|---:|---:|---:|"]
    for w in WORKLOADS:
        one, single, two = measure(w, cores, 1, args.steps), measure(w, half, 1, args.steps), \
            measure(w, half, 2, args.steps)
        lines.append(f"| {w} | {one:.0f} img/s | {single:.0f} img/s | {two:.0f} img/s | {two / one:.2f}x |")
        print(lines[-1], flush=True)
    body = ("Independent jobs in two processes or one (dpldm/recipes/jobs.py runs the quickstart's DP runs, "
            "sampling and classifiers two at a time): summed throughput, medians of "
            f"{args.steps} steps per process.\n\n" + "\n".join(lines))
    print(body)
    write_section("Threads or processes", body)


if __name__ == "__main__":
    main()
