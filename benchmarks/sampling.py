"""Sampling throughput: images/s of `dpldm.sample.generate` (DPM-Solver++, CFG on) at several resolutions
with a small pipeline built from configs. Prints a table and writes docs/benchmarks.md "Sampling".

Then "Sampling precision": the quickstart's own sampling (configs/pretrain_glyphs.yaml's models, random weights,
with and without its LoDA adapter; 1,000 images, 4 DPM-Solver++ steps, no guidance, batches of 250, one thread
as in the quickstart's job processes) at fp32 and bf16 autocast (dpldm/precision.py), medians of 3 runs."""
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
    precision()


def precision(n: int = 1000, repeat: int = 3) -> None:
    import statistics

    import torch

    from dpldm.config import AdapterConfig, load_config
    from dpldm.models.adapters import attach_adapter
    from dpldm.models.pipeline import build_components
    from dpldm.precision import native_bf16
    from dpldm.sample import generate
    torch.set_num_threads(1)
    root = Path(__file__).resolve().parent.parent / "configs"
    mc = load_config(root / "pretrain_glyphs.yaml").model
    ad = load_config(root / "quickstart.yaml").adapter
    rows = []
    for adapter in (None, ad):
        torch.manual_seed(0)
        comps = build_components(mc)
        if adapter is not None:
            attach_adapter(comps.unet, AdapterConfig(**vars(adapter)))
        comps.unet.eval()
        ips = {}
        for prec in ("fp32", "bf16"):
            def run():
                return generate(comps, [f"a handwritten digit {i % 10}" for i in range(n)], list(range(n)),
                                guidance=1.0, steps=4, scheduler="dpm++", seed=0, batch_size=250, resolution=32,
                                precision=prec)
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            ips[prec] = n / statistics.median(times)
        name = f"LoDA rank {adapter.rank}, {'+'.join(adapter.levels)} (configs/quickstart.yaml)" if adapter else None
        rows.append((name or "pretrained U-Net", ips["fp32"], ips["bf16"]))
    lines = ["| U-Net | fp32 images/s | bf16 images/s | bf16 / fp32 |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {a:.0f} | {b:.0f} | {b / a:.2f}x |" for name, a, b in rows]
    body = (f"The quickstart's sampling at one thread ({n:,} images, 4 DPM-Solver++ steps, no guidance, batches "
            f"of 250; medians of {repeat} runs). Native bf16 on this CPU: {native_bf16('cpu')} "
            "(`sample.precision: auto` uses bf16 only then).\n\n" + "\n".join(lines))
    print(body)
    write_section("Sampling precision", body)


if __name__ == "__main__":
    main()
