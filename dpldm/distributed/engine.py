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


def make_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.betas[0], weight_decay=cfg.weight_decay)


class TorchEngine:
    """Single-process (or replicated, grads already reduced by the caller) torch optimizer."""

    def __init__(self, module: nn.Module, trainable: dict[str, nn.Parameter], optim_cfg: OptimConfig):
        self.module = module
        self.trainable = trainable
        self.optimizer = make_optimizer(list(trainable.values()), optim_cfg)
        self.warmup = optim_cfg.warmup_steps
        self.base_lr = optim_cfg.lr
        self.steps = 0

    def params(self) -> dict[str, torch.Tensor]:
        """Full-precision values of the trainable parameters (for per-example gradients)."""
        return self.trainable

    def backward(self, loss: torch.Tensor) -> None:
        """Non-private step: local backward, then the gradients are averaged over ranks (if several)."""
        loss.backward()
        from dpldm.distributed.env import all_reduce_sum_, world_size
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
        if self.warmup:
            for g in self.optimizer.param_groups:
                g["lr"] = self.base_lr * min(1.0, (self.steps + 1) / self.warmup)
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
                dist_cfg: DistributedConfig):
    if dist_cfg.deepspeed:
        from dpldm.distributed.deepspeed_engine import DeepSpeedEngine
        return DeepSpeedEngine(module, trainable, optim_cfg, dist_cfg)
    return TorchEngine(module, trainable, optim_cfg)
