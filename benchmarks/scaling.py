"""Data-parallel scaling of one DP fine-tuning step on CPU (gloo): samples/s on 1 and 2 processes, scaling
efficiency, and bytes communicated per logical step for plain torch and ZeRO 1/2/3 (counted by wrapping
torch.distributed's collectives, next to an estimate from the trainable parameter count).

    python benchmarks/scaling.py            # launches itself with torchrun on 1 and 2 processes
The model is a small diffusers UNet2DConditionModel whose attention projections are trainable (DP-LDM);
each process uses one thread, so 2 processes use the machine's 2 cores.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENGINES = {"torch": "", "zero1": "configs/deepspeed/zero1.json", "zero2": "configs/deepspeed/zero2.json",
           "zero3": "configs/deepspeed/zero3.json"}
EXPECTED_BS, STEPS, WARMUP = 32, 4, 1
COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_gather", "broadcast",
               "reduce_scatter", "reduce", "all_to_all_single")


def _count_collectives(counter: dict) -> None:
    """Wrap torch.distributed collectives to add each call's payload bytes (per rank) to counter."""
    import torch
    import torch.distributed as dist

    def size(x):
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(size(t) for t in x)
        return 0
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapped(*a, _fn=fn, _name=name, **kw):
            # the full (unpartitioned) tensor: all-gather's output, reduce-scatter's input, else the argument
            tensors = list(a) + list(kw.values())
            full = tensors[1] if _name == "reduce_scatter_tensor" and len(tensors) > 1 else tensors[0]
            counter[_name] = counter.get(_name, 0) + size(full)
            return _fn(*a, **kw)
        setattr(dist, name, wrapped)


def worker(out: str) -> None:
    import torch
    from diffusers import UNet2DConditionModel
    from torch.func import functional_call

    sys.path.insert(0, str(ROOT))
    from dpldm.config import DistributedConfig, OptimConfig
    from dpldm.distributed.engine import make_engine
    from dpldm.distributed.env import all_reduce_sum_, init_distributed
    from dpldm.privacy.dp_step import add_noise_and_normalize, noise_generator
    from dpldm.privacy.ghost_clipping import ghost_clipped_grad_sum

    torch.set_num_threads(1)
    env = init_distributed("gloo")
    counter: dict = {}
    _count_collectives(counter)
    results = {}
    for name, ds in ENGINES.items():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)
        unet.requires_grad_(False)
        trainable = {k: p for k, p in unet.named_parameters() if "attn" in k}
        for p in trainable.values():
            p.requires_grad_(True)
        engine = make_engine(unet, trainable, OptimConfig(lr=1e-4),
                             DistributedConfig(deepspeed=str(ROOT / ds) if ds else "", backend="gloo"))

        def batch_loss(params, x, c, noise):     # per-example losses of a micro-batch, as the trainer's
            pred = functional_call(unet, params, (x, torch.full((len(x),), 500)),
                                   {"encoder_hidden_states": c, "return_dict": False})[0]
            return (pred - noise).pow(2).flatten(1).mean(1)
        local = EXPECTED_BS // env.world_size
        g = torch.Generator().manual_seed(env.rank)
        batch = (torch.randn(local, 4, 8, 8, generator=g), torch.randn(local, 4, 32, generator=g),
                 torch.randn(local, 4, 8, 8, generator=g))
        times, comm = [], []
        for step in range(WARMUP + STEPS):
            counter.clear()
            t0 = time.perf_counter()
            grad_sum, _ = ghost_clipped_grad_sum(unet, engine.params(), batch_loss, batch, 1.0, 8, rows_per_example=1)
            all_reduce_sum_(grad_sum)
            engine.set_grads(add_noise_and_normalize(grad_sum, 1.0, 1.0, EXPECTED_BS, noise_generator(0, step)))
            engine.step()
            times.append(time.perf_counter() - t0)
            comm.append(dict(counter))
        results[name] = {"step_s": sorted(times[WARMUP:])[len(times[WARMUP:]) // 2], "comm": comm[-1],
                         "trainable": sum(p.numel() for p in trainable.values())}
    if env.rank == 0:
        Path(out).write_text(json.dumps(results))


def _launch(nproc: int, out: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from launchers.local import torchrun
    proc = torchrun([__file__, "--worker", str(out)], nproc=nproc, timeout=None)
    if proc.returncode != 0:
        sys.exit(f"scaling worker on {nproc} process(es) failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def estimate(params: int, world: int, engine: str) -> int:
    """Bytes one rank sends per step (ring algorithms, fp32): the DP all-reduce of the clipped sum plus
    what DeepSpeed moves: all-reduce (1) or reduce-scatter (2, 3) of the gradient, all-gather of updated
    parameters (1, 2), and under ZeRO 3 the all-gathers for the surrogate forward and the module sync."""
    b, w = 4 * params, world
    if w == 1:
        return 0
    ring_ar, ring_half = 2 * (w - 1) * b // w, (w - 1) * b // w
    extra = {"torch": 0, "zero1": ring_ar + ring_half, "zero2": 2 * ring_half, "zero3": 3 * ring_half}[engine]
    return ring_ar + extra


def main() -> None:
    sys.path.insert(0, str(HERE))
    from common import write_section
    with tempfile.TemporaryDirectory() as tmp:
        one = _launch(1, Path(tmp) / "one.json")
        two = _launch(2, Path(tmp) / "two.json")
    rows = ["| engine | trainable params | 1 proc samples/s | 2 procs samples/s | efficiency | "
            "collectives per step, full tensor MB (measured) | sent per rank (ring, from measured) | "
            "sent per rank (estimate from parameter count) |",
            "|---|---|---|---|---|---|---|---|"]
    for name in ENGINES:
        s1, s2 = EXPECTED_BS / one[name]["step_s"], EXPECTED_BS / two[name]["step_s"]
        comm = two[name]["comm"]
        sent = sum(v * (2 if k == "all_reduce" else 1) * (2 - 1) / 2 for k, v in comm.items())
        detail = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in sorted(two[name]["comm"].items()))
        p = two[name]["trainable"]
        rows.append(f"| {name} | {p:,} | {s1:.1f} | {s2:.1f} | {s2 / (2 * s1):.0%} | {detail} | "
                    f"{sent / 1e6:.2f} MB | {estimate(p, 2, name) / 1e6:.2f} MB |")
    body = ("One DP logical step (expected batch 32, per-example clipping by the ghost / book-keeping engine "
            "that `privacy.clipping: auto` picks, noise once, micro-batch 8) on a small diffusers U-Net with "
            "trainable attention projections; gloo, one thread per process. "
            "Efficiency = samples/s on 2 processes / (2 × samples/s on 1). Collectives are counted by wrapping "
            "torch.distributed on one rank for one step: size of the full tensor each all-reduce, all-gather or "
            "reduce-scatter works on (MB = 1e6 bytes). A ring sends 2(W-1)/W of that per rank for an all-reduce, "
            "(W-1)/W for an all-gather or reduce-scatter. The estimate assumes: DP all-reduce of the clipped "
            "sum (all engines), plus gradient all-reduce + parameter all-gather (ZeRO 1), gradient "
            "reduce-scatter + parameter all-gather (ZeRO 2), parameter all-gathers for the surrogate forward "
            "and the module sync + gradient reduce-scatter (ZeRO 3). Timings on a shared 2-core machine are "
            "noisy (±20%). Measured, DeepSpeed 0.19 ZeRO 2 reduced the gradient with an all-reduce on gloo, not a "
            "reduce-scatter. With adapter-sized trainable sets the DP all-reduce dominates and plain torch moves "
            "the fewest bytes; ZeRO saves memory (optimizer state, gradients, parameters) for full fine-tuning.\n\n"
            + "\n".join(rows) + "\n")
    print(body)
    write_section("Scaling", body)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
