"""Exponential moving average of a module's floating-point parameters (for pretraining).

    ema = EMA(unet, decay=0.999); ...; ema.update(unet)   # after each optimizer step
    ema.copy_to(unet_copy)                                 # EMA weights into a module of the same shape

The effective decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (as diffusers'
EMAModel), so short runs are not dominated by the random initialisation.
"""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1); got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().clone().float() for n, p in module.named_parameters()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = self.current_decay()
        for n, p in module.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> nn.Module:
        for n, p in module.named_parameters():
            p.copy_(self.shadow[n].to(device=p.device, dtype=p.dtype))
        return module

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly); the update count rides along as a 0-d tensor."""
        return {**{f"shadow.{n}": t.cpu().contiguous() for n, t in self.shadow.items()},
                "updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.shadow if f"shadow.{n}" not in state]
        if missing:
            raise KeyError(f"EMA state lacks {missing[:3]}")
        for n in self.shadow:
            self.shadow[n].copy_(state[f"shadow.{n}"])
        self.updates = int(state["updates"])
