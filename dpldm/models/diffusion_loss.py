"""The latent diffusion training loss, one value per example (k-diffusion style), with noise multiplicity.

Noise multiplicity (DPDM): each example draws K (timestep, noise) pairs and its K losses are averaged
*before* its gradient is taken and clipped, so the sensitivity stays C while the loss variance drops.

Every random draw of an example is a function of (run seed, step, global example index) only, so results do
not depend on micro-batch size, rank count or the order examples are processed in.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from dpldm.rng import RunRandomness


def example_draws(seed: int, step: int, indices, k: int, latent_shape: tuple[int, ...], num_timesteps: int,
                  cond_dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example timesteps [B,K], Gaussian noise [B,K,*latent_shape] and null-condition mask [B].

    Example i at step s draws from the run seed's ("example", s, i) stream (dpldm/rng.py).
    """
    rng = RunRandomness(seed)
    ts, noises, drops = [], [], []
    for index in [int(i) for i in indices]:
        g = rng.numpy("example", step, index)
        ts.append(g.integers(0, num_timesteps, k))
        noises.append(g.standard_normal((k, *latent_shape), dtype=np.float32))
        drops.append(g.random() < cond_dropout)
    if not ts:
        return (torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k, *latent_shape),
                torch.zeros(0, dtype=torch.bool))
    return (torch.from_numpy(np.stack(ts)).long(), torch.from_numpy(np.stack(noises)),
            torch.from_numpy(np.array(drops, dtype=bool)))


def diffusion_loss(unet_call: Callable, alphas_cumprod: torch.Tensor, x0: torch.Tensor, cond: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """Mean over K draws of the per-draw MSE; returns [B].

    unet_call(x_t [B*K,C,h,w], t [B*K], cond [B*K,L,D]) -> prediction; x0 [B,C,h,w]; cond [B,L,D];
    t [B,K]; noise [B,K,C,h,w].
    """
    b, k = t.shape
    x0k = x0.unsqueeze(1).expand(b, k, *x0.shape[1:]).reshape(b * k, *x0.shape[1:])
    eps = noise.reshape(b * k, *x0.shape[1:])
    ab = alphas_cumprod.to(x0.device)[t.reshape(-1)].to(x0.dtype).reshape(b * k, *([1] * (x0.dim() - 1)))
    x_t = ab.sqrt() * x0k + (1 - ab).sqrt() * eps
    condk = cond.unsqueeze(1).expand(b, k, *cond.shape[1:]).reshape(b * k, *cond.shape[1:])
    pred = unet_call(x_t, t.reshape(-1), condk)
    if prediction_type == "v_prediction":
        target = ab.sqrt() * eps - (1 - ab).sqrt() * x0k
    else:
        target = eps
    per_draw = (pred.float() - target.float()).pow(2).reshape(b, k, -1).mean(-1)
    return per_draw.mean(-1)


def unet_caller(unet) -> Callable:
    """Adapt a diffusers UNet2DConditionModel to unet_call(x_t, t, cond)."""
    def call(x_t, t, cond):
        return unet(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]
    return call
