"""Sampling throughput: images/s of `dpldm.sample.generate` (DPM-Solver++, CFG on) at several resolutions
with a small pipeline built from configs. Prints a table and writes docs/benchmarks.md "Sampling"."""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import write_section  # noqa: E402


def main() -> None:
    import torch

    from dpldm.models.pipeline import load_pipeline
    from dpldm.sample import generate
    from tiny import make_tiny_pipeline
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for res, n, steps in ((32, 64, 10), (64, 16, 10), (256, 2, 5)):
            comps = load_pipeline(make_tiny_pipeline(Path(tmp) / f"p{res}", resolution=res))
            if torch.cuda.is_available():
                comps.unet.cuda()
            generate(comps, ["digit 1"] * 2, [0, 1], guidance=2.0, steps=2, scheduler="dpm++", seed=0,
                     batch_size=2, resolution=res)  # warm-up
            t0 = time.perf_counter()
            imgs = generate(comps, ["digit 1"] * n, list(range(n)), guidance=2.0, steps=steps, scheduler="dpm++",
                            seed=0, batch_size=n, resolution=res)
            dt = time.perf_counter() - t0
            rows.append((res, n, steps, tuple(imgs.shape), n / dt))
    lines = ["| resolution | images | sampler steps | output shape | images/s |", "|---|---|---|---|---|"]
    lines += [f"| {r} | {n} | {s} | {shape} | {ips:.2f} |" for r, n, s, shape, ips in rows]
    body = ("Tiny test pipeline (VAE factor 2, U-Net channels 16/32), DPM-Solver++ with classifier-free "
            "guidance (two U-Net passes per step).\n\n" + "\n".join(lines))
    print(body)
    write_section("Sampling", body)


if __name__ == "__main__":
    main()
