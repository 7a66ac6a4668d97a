"""Exponential moving average of a module's parameters, or of a named subset of them.

    ema = EMA(unet, decay=0.999); ...; ema.update(unet)   # pretraining: after each optimizer step
    ema.copy_to(unet_copy)                                 # EMA weights into a module of the same shape
    ema = EMA(trainable, decay=0.9)                        # DP fine-tune: the adapter's {name: parameter}

Averaging the iterates of a DP run is post-processing of its noisy updates: it costs no privacy.

The effective decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (as diffusers'
EMAModel), so short runs are not dominated by the random initialisation.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn


def _named(params: nn.Module | Mapping[str, torch.Tensor]) -> Iterable[tuple[str, torch.Tensor]]:
    return params.named_parameters() if isinstance(params, nn.Module) else params.items()


class EMA:
    def __init__(self, params: nn.Module | Mapping[str, torch.Tensor], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1); got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().clone().float() for n, p in _named(params)}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, params: nn.Module | Mapping[str, torch.Tensor]) -> None:
        d = self.current_decay()
        named = list(_named(params))
        torch._foreach_lerp_([self.shadow[n] for n, _ in named], [p.detach().float() for _, p in named], 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, params: nn.Module | Mapping[str, torch.Tensor]):
        for n, p in _named(params):
            p.copy_(self.shadow[n].to(device=p.device, dtype=p.dtype))
        return params

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
