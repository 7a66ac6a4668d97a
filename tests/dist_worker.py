"""Worker for tests/test_distributed.py: DP-SGD logical steps on a tiny conv net, on 1 or N ranks.

    torchrun --nproc_per_node 2 tests/dist_worker.py --out DIR [--resume-from DIR2]
    python tests/dist_worker.py --out DIR                      (one process)

For each engine (plain torch, ZeRO 1, 2, 3) it runs STEPS logical DP steps the way the trainer does
(global Poisson draw, per-rank slice, clipped per-example gradient sum by the ghost / book-keeping engine that
`privacy.clipping: auto` picks, all-reduce, noise once, normalise
by the expected batch size, set_grads + step), once with sigma=0 and once with sigma>0, and saves the
trainable weights, the injected noise and the engine state after CKPT_AT steps to DIR/rank{r}.pt.
With --resume-from it also loads the engine state another world size saved and finishes the run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dpldm.config import DistributedConfig, OptimConfig  # noqa: E402
from dpldm.data.poisson import PoissonSampler, split_for_rank  # noqa: E402
from dpldm.privacy.dp_step import add_noise_and_normalize, noise_generator  # noqa: E402
from dpldm.privacy.ghost_clipping import ghost_clipped_grad_sum  # noqa: E402
from dpldm.distributed.engine import make_engine  # noqa: E402
from dpldm.distributed.env import all_reduce_sum_, init_distributed  # noqa: E402

N, EXPECTED_BS, STEPS, CKPT_AT, C, SIGMA, SEED = 48, 12, 4, 2, 0.5, 2.0, 7
ROOT = Path(__file__).resolve().parents[1]
ENGINES = {"torch": "", "zero1": "configs/deepspeed/zero1.json", "zero2": "configs/deepspeed/zero2.json",
           "zero3": "configs/deepspeed/zero3.json"}


class TinyNet(nn.Module):
    """Frozen stem + trainable conv and linear head (the trainable subset of a bigger frozen model)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 3)
        self.stem.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.tanh(self.body(torch.tanh(self.stem(x)))).flatten(1))


def data():
    g = torch.Generator().manual_seed(123)
    return torch.randn(N, 1, 6, 6, generator=g), torch.randint(0, 3, (N,), generator=g)


def batch_loss_fn(model):
    """Per-example losses [b] of a micro-batch, as the ghost engine (the trainer's default) takes them."""
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}

    def loss(params, x, y):
        out = functional_call(model, {**frozen, **params}, (x,))
        return nn.functional.cross_entropy(out, y, reduction="none")
    return loss


def run(engine_name: str, sigma: float, env, resume: dict | None = None):
    torch.manual_seed(0)
    model = TinyNet()
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    engine = make_engine(model, trainable, OptimConfig(name="adam", lr=0.05),
                         DistributedConfig(deepspeed=str(ROOT / ENGINES[engine_name]) if ENGINES[engine_name] else "",
                                           backend="gloo"))
    x, y = data()
    sampler = PoissonSampler(N, EXPECTED_BS / N, SEED)
    start, ckpt, noises = 0, None, []
    if resume is not None:
        with torch.no_grad():
            for k, p in trainable.items():
                p.copy_(resume["weights"][k])
        engine.load_state_dict(resume["engine"])
        sampler.load_state_dict(resume["sampler"])
        start = CKPT_AT
    for step in range(start, STEPS):      # the trainer's logical step (dpldm/train/finetune.py)
        local = torch.as_tensor(split_for_rank(sampler.next_indices(), env.rank, env.world_size))
        grad_sum, _ = ghost_clipped_grad_sum(model, engine.params(), batch_loss_fn(model), (x[local], y[local]), C, 4)
        all_reduce_sum_(grad_sum)
        grads = add_noise_and_normalize(grad_sum, sigma, C, EXPECTED_BS, noise_generator(SEED, step))
        noises.append(torch.cat([(grads[k] - grad_sum[k] / EXPECTED_BS).flatten() for k in sorted(grads)]))
        engine.set_grads(grads)
        engine.step()
        if step + 1 == CKPT_AT and resume is None:
            ckpt = {"engine": engine.state_dict(), "sampler": sampler.state_dict(),
                    "weights": {k: v.detach().clone() for k, v in engine.params().items()}}
    weights = {k: v.detach().clone() for k, v in engine.params().items()}
    return {"weights": weights, "noise": torch.stack(noises), "ckpt": ckpt}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume-from", default="")
    ap.add_argument("--engines", default=",".join(ENGINES))
    args = ap.parse_args()
    env = init_distributed("gloo")
    result = {}
    for name in args.engines.split(","):
        result[name] = {"sigma0": run(name, 0.0, env), "sigma": run(name, SIGMA, env)}
        if args.resume_from:
            other = torch.load(Path(args.resume_from) / "rank0.pt", weights_only=False)
            result[name]["resumed"] = run(name, 0.0, env, resume=other[name]["sigma0"]["ckpt"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"rank{env.rank}.pt")


if __name__ == "__main__":
    main()
