"""Optimizer stepping behind one interface: plain torch, or DeepSpeed ZeRO (added by the distributed work;
deepspeed is imported only in dpldm/distributed/).

    engine = make_engine(model, trainable, cfg.optim, cfg.distributed)
    engine.backward(loss); engine.step()          # non-private (pretraining, No-DP baseline)
    engine.set_grads(grads); engine.step()        # DP: grads are the noised, normalised sum
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from dpldm.config import DistributedConfig, OptimConfig
from dpldm.distributed.env import all_reduce_sum_, world_size
from dpldm.distributed.optim import make_optimizer, set_lr


class TorchEngine:
    """Single-process (or replicated, grads already reduced by the caller) torch optimizer."""

    def __init__(self, module: nn.Module, trainable: dict[str, nn.Parameter], optim_cfg: OptimConfig,
                 total_steps: int = 0):
        self.module = module
        self.trainable = trainable
        self.optimizer = make_optimizer(list(trainable.values()), optim_cfg)
        self.optim_cfg, self.total_steps = optim_cfg, total_steps
        self.steps = 0

    def params(self) -> dict[str, torch.Tensor]:
        """Full-precision values of the trainable parameters (for per-example gradients)."""
        return self.trainable

    def backward(self, loss: torch.Tensor) -> None:
        """Non-private step: local backward, then the gradients are averaged over ranks (if several)."""
        loss.backward()
        world = world_size()
        if world > 1:
            for p in self.trainable.values():   # same tensors on every rank, or all_reduce hangs
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = {n: p.grad for n, p in self.trainable.items()}
            all_reduce_sum_(grads)
            for g in grads.values():
                g.div_(world)

    def set_grads(self, grads: dict[str, torch.Tensor]) -> None:
        for name, p in self.trainable.items():
            p.grad = grads[name].to(p.dtype).reshape(p.shape).clone()

    def step(self) -> None:
        set_lr(self.optimizer, self.optim_cfg, self.steps, self.total_steps)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    def state_dict(self) -> dict:
        """A snapshot (copied: torch's optimizer state_dict aliases the live state tensors)."""
        return copy.deepcopy({"optimizer": self.optimizer.state_dict(), "steps": self.steps})

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = state["steps"]


def make_engine(module: nn.Module, trainable: dict[str, nn.Parameter], optim_cfg: OptimConfig,
                dist_cfg: DistributedConfig, total_steps: int = 0):
    """`total_steps` (0 = unknown) sets the end of the learning-rate decay (dpldm/distributed/optim.py)."""
    if dist_cfg.deepspeed:   # imported here: deepspeed is heavy and optional for single-process runs
        from dpldm.distributed.deepspeed_engine import DeepSpeedEngine
        return DeepSpeedEngine(module, trainable, optim_cfg, dist_cfg, total_steps)
    return TorchEngine(module, trainable, optim_cfg, total_steps)
