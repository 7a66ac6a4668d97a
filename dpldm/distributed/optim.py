"""The optimizer and its learning-rate schedule, shared by both engines (plain torch and DeepSpeed).

    optimizer = make_optimizer(params, cfg.optim)
    set_lr(optimizer, cfg.optim, step, total_steps)    # before each optimizer step

Schedule: linear warm-up over `optim.warmup_steps`, then `optim.decay` (`none`: flat; `cosine`: from lr
down to `optim.min_lr_ratio`·lr at the run's last step). A function of the step count only, so it
is the same on every rank and after a resume.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dpldm.config import OptimConfig


def make_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam/AdamW run fused (one kernel over all tensors; CPU and CUDA): on the quickstart U-Net's 208 parameter
    tensors torch's CPU default, a per-tensor loop, took ~19 ms per step, the fused one ~5 ms: ~6% of a pretraining
    step at two threads (benchmarks/optimizer_step.py, docs/benchmarks.md)."""
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.betas[0], weight_decay=cfg.weight_decay)


def lr_at(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based) in a run of `total_steps` (0 = unknown: no decay)."""
    lr = cfg.lr
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "cosine" and total_steps > cfg.warmup_steps + 1:
        progress = min(1.0, (step - cfg.warmup_steps) / (total_steps - 1 - cfg.warmup_steps))
        return lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return lr


def set_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int, total_steps: int) -> None:
    lr = lr_at(cfg, step, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
