"""The optimizer's share of a training step: torch's AdamW as a per-tensor loop (its CPU default), `foreach`, and
`fused` (what dpldm/distributed/optim.py uses), alone and inside the quickstart's U-Net pretraining step.

    .venv/bin/python benchmarks/optimizer_step.py [--steps 30]

The model is configs/pretrain_glyphs.yaml's latent U-Net (1.2M parameters in 208 tensors, where a per-tensor
loop pays Python and kernel-launch costs 208 times per step); the training step is an AdamW step on a batch of 64
8x8x4 latents with 16x384 conditioning, as `dpldm pretrain unet` takes it, then the EMA update. Medians of --steps
steps after a warm-up, at 1 thread and at every core, variants interleaved. Prints a table and writes the
"Optimizer step" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"per-tensor loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def measure(threads: int, steps: int) -> dict[str, tuple[float, float]]:
    """{variant: (optimizer step ms, whole training step ms)} at `threads` threads."""
    from dpldm.config import load_config
    from dpldm.models.ema import EMA
    from dpldm.models.pipeline import build_unet
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = build_unet(load_config(ROOT / "configs" / "pretrain_glyphs.yaml").model, 384, 8)
    params = list(unet.parameters())
    ema = EMA(unet, 0.999)
    x, c, t = torch.randn(64, 4, 8, 8), torch.randn(64, 16, 384), torch.randint(0, 1000, (64,))
    opts = {name: torch.optim.AdamW(params, 1e-4, **kw) for name, kw in VARIANTS.items()}
    opt_ms = {name: [] for name in VARIANTS}
    step_ms = {name: [] for name in VARIANTS}
    for i in range(steps + 3):
        for name, opt in opts.items():     # interleaved, so a slow spell of the machine hits every variant
            t0 = time.perf_counter()
            loss = unet(x, t, encoder_hidden_states=c).sample.pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            ema.update(unet)
            t3 = time.perf_counter()
            if i >= 3:
                opt_ms[name].append(1e3 * (t2 - t1))
                step_ms[name].append(1e3 * (t3 - t0))
    return {n: (statistics.median(opt_ms[n]), statistics.median(step_ms[n])) for n in VARIANTS}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    lines = ["| threads | variant | AdamW step | whole training step | step / fused step |",
             "|---:|---|---:|---:|---:|"]
    for threads in sorted({1, cores}):
        res = measure(threads, args.steps)
        for name, (opt, step) in res.items():
            lines.append(f"| {threads} | {name} | {opt:.1f} ms | {step:.0f} ms | {step / res['fused'][1]:.2f}x |")
            print(lines[-1], flush=True)
    body = ("AdamW on the quickstart's pretraining U-Net (1.2M parameters, 208 tensors), alone and inside a whole "
            "training step (forward, backward, AdamW, EMA; batch 64), medians of "
            f"{args.steps} interleaved steps. `make_optimizer` (dpldm/distributed/optim.py) runs Adam/AdamW fused."
            "\n\n" + "\n".join(lines))
    print(body)
    write_section("Optimizer step", body)


if __name__ == "__main__":
    main()
