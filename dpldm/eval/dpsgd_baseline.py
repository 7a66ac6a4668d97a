"""The DP-SGD baseline: a classifier trained directly on the private data with opacus, at the same
(ε, δ) as the synthetic-data runs — the row every DP image-synthesis paper compares against.

    model, ledger = train_dpsgd_classifier(x_priv, y_priv, target_epsilon=1.0, delta=1e-5)

A strong baseline as the literature tunes it (Tramèr & Boneh 2021; De et al. 2022): tanh CNN without
BatchNorm, large Poisson batches, a small clip norm, few epochs, momentum SGD with a large learning
rate. The defaults were tuned on PUBLIC data only (see docs/evaluation.md: MNIST train[40k:50k] for
training, the MNIST validation split for scoring), never on the private set or the test set.

Randomness (privacy invariant 7, docs/privacy.md): by default (`seed=None`) the initialisation, the Poisson sampling
and the
noise come from streams of a fresh 128-bit secret seed (`dpldm.rng.secret_seed`) that is returned nowhere.
The Poisson draws and the noise use numpy PCG64 generators (128-bit state) derived from it — not opacus'
own, which draw from a torch CPU generator that keeps only 32 bits of its seed (seeds s and s + 2³² give the
same draws): opacus clips and sums, dpldm calibrates σ and accounts (replace-one, PLD, by default, like the
fine-tunes), draws the batches and the noise. An explicit
`seed` makes everything reproducible by whoever has it: the ledger then carries EXPLICIT_SEED_WARNING.
An empty Poisson batch (possible whenever q·N is small) takes a noise-only step, as the fine-tune does.
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch.utils.data import DataLoader, TensorDataset

from dpldm.errors import DpldmError
from dpldm.eval.classifier import AUGMENTS, _check, build_classifier, random_affine
from dpldm.log import log
from dpldm.privacy.accountant import epsilon, noise_multiplier_for
from dpldm.privacy.ledger import EXPLICIT_SEED_WARNING
from dpldm.rng import RunRandomness, secret_seed


# Tuned on public data (docs/evaluation.md); override per call.
DEFAULTS = dict(epochs=15, expected_batch_size=1000, max_grad_norm=0.1, lr=0.0, momentum=0.9, arch="cnn", width=0)


def budget_defaults(target_epsilon: float) -> dict:
    """CNN width and SGD lr by budget, chosen on the public split (docs/evaluation.md): at ε=1 width 8
    with lr 2 was best (92.5%; width 16: 88.7%), at ε=10 width 16 with lr 4 (95.9%; width 8: 95.0%).
    Fewer parameters and smaller steps pay off when the noise is large."""
    return {"width": 8, "lr": 2.0} if target_epsilon < 4 else {"width": 16, "lr": 4.0}


def train_dpsgd_classifier(images: torch.Tensor, labels: torch.Tensor, target_epsilon: float, delta: float,
                           epochs: int = DEFAULTS["epochs"],
                           expected_batch_size: int = DEFAULTS["expected_batch_size"],
                           max_grad_norm: float = DEFAULTS["max_grad_norm"], lr: float = DEFAULTS["lr"],
                           momentum: float = DEFAULTS["momentum"], optimizer: str = "sgd",
                           arch: str = DEFAULTS["arch"], width: int = DEFAULTS["width"],
                           accountant: str = "pld", relation: str = "replace_one", seed: int | None = None,
                           num_classes: int | None = None, verbose: bool = False, augment: str = "none",
                           label_smoothing: float = 0.0):
    """Train with opacus DP-SGD (Poisson sampling, per-example clipping to `max_grad_norm`, noise
    calibrated by dpldm's accountant to spend `target_epsilon` at `delta` over `epochs` under `relation`:
    replace-one by default, as the fine-tunes it is compared with, so both rows' ε mean the same thing).
    `width`/`lr` 0 take the budget's tuned values (`budget_defaults`). `seed=None` (default) draws a fresh
    secret seed; an explicit seed is for tests and is flagged "not a release" in the ledger's warnings.
    `augment` "affine": each example of a Poisson batch is seen as one random_affine view (its own clipped
    gradient, so the guarantee is unchanged); measured to cost accuracy here (docs/results.md, round 12).
    `label_smoothing`: each example's cross-entropy against smoothed targets (a per-example loss like any other:
    the guarantee is unchanged); measured on public data in docs/results.md, round 13.
    Returns (model in eval mode, ledger dict with epsilon spent, delta, accountant, noise_multiplier,
    sample_rate, steps, ...): nothing in it is computed from the private data beyond the accountant's output
    (throughput counts expected batches)."""
    _check(images, labels, "train_dpsgd_classifier")
    if augment not in AUGMENTS:
        raise DpldmError(f"dpsgd baseline: augment must be one of {', '.join(AUGMENTS)}; got {augment!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise DpldmError(f"dpsgd baseline: label_smoothing must be in [0, 1); got {label_smoothing!r}")
    n = len(images)
    if not 0 < delta < 1:
        raise DpldmError(f"dpsgd baseline: delta must be in (0, 1); got {delta}")
    if delta >= 1.0 / n:
        warnings.warn(f"dpsgd baseline: delta={delta} is not below 1/N={1 / n:.2e}; the guarantee is weak")
    if target_epsilon <= 0:
        raise DpldmError(f"dpsgd baseline: target_epsilon must be > 0; got {target_epsilon}")
    if not 0 < expected_batch_size <= n:
        raise DpldmError(f"dpsgd baseline: expected_batch_size must be in 1..{n} (dataset size); "
                         f"got {expected_batch_size}")
    num_classes = num_classes or int(labels.max()) + 1
    explicit = seed is not None
    rng = RunRandomness(int(seed) if explicit else secret_seed())
    torch.manual_seed(rng.int_seed("dpsgd-init"))             # the classifier's initial weights
    tuned = budget_defaults(target_epsilon)
    width = width or (tuned["width"] if arch == "cnn" else 0)
    lr = lr or (tuned["lr"] if optimizer == "sgd" else 1e-3)
    model = build_classifier(arch, images.shape[1], num_classes, images.shape[-1], width)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        raise DpldmError(f"dpsgd baseline: optimizer must be sgd or adam; got {optimizer!r}")
    # opacus accounts for Poisson sampling at q = 1 / len(loader) (= B/N when B divides N), len(loader) steps
    # per epoch; its own Poisson loader is not used (see the module docstring): `poisson` draws the same way
    loader = DataLoader(TensorDataset(images, labels), batch_size=expected_batch_size)
    sample_rate, steps_per_epoch = 1.0 / len(loader), len(loader)
    sigma = noise_multiplier_for(target_epsilon, sample_rate, epochs * steps_per_epoch, delta, accountant, relation)
    engine = PrivacyEngine()   # opacus clips, sums and scales; σ and ε come from dpldm's accountant
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus' secure-RNG notice
        model, opt, _ = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma,
                                            max_grad_norm=max_grad_norm, poisson_sampling=True)
    _draw_noise_from(opt, rng.numpy("dpsgd-noise"))
    poisson = rng.numpy("dpsgd-poisson")
    views = torch.Generator().manual_seed(rng.int_seed("dpsgd-views"))
    t0, steps = time.perf_counter(), 0
    model.train()
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            idx = torch.from_numpy(np.flatnonzero(poisson.random(n) < sample_rate))
            x, y = images[idx], labels[idx]
            if augment == "affine" and len(x):
                x = random_affine(x, views)
            opt.zero_grad(set_to_none=True)
            if len(x):
                loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
                loss.backward()
            else:
                _empty_per_sample_grads(opt)  # an empty Poisson batch: a noise-only step
            opt.step()
            steps += 1
        if verbose:
            spent = epsilon(sigma, sample_rate, steps, delta, accountant, relation)
            log(f"dp-sgd epoch {epoch + 1}/{epochs}: eps {spent:.3f}", err=True)
    seconds = time.perf_counter() - t0
    eps = float(epsilon(sigma, sample_rate, steps, delta, accountant, relation))
    ledger = {
        "epsilon": eps, "target_epsilon": float(target_epsilon), "delta": float(delta),
        "accountant": accountant, "noise_multiplier": float(opt.noise_multiplier),
        "sample_rate": sample_rate, "steps": steps, "private": True, "sampling": "poisson",
        "max_grad_norm": max_grad_norm, "expected_batch_size": sample_rate * n, "dataset_size": n,
        "epochs": epochs, "lr": lr, "optimizer": optimizer, "arch": arch, "width": width, "augment": augment,
        "label_smoothing": label_smoothing,
        "seconds": seconds, "images_per_s": steps * sample_rate * n / max(seconds, 1e-9),
        "relation": relation, "seed": "explicit" if explicit else "secret",
        "warnings": [EXPLICIT_SEED_WARNING] if explicit else [],
    }
    net = model._module if hasattr(model, "_module") else model
    return net.eval(), ledger


def _draw_noise_from(opt, gen: np.random.Generator) -> None:
    """Make opacus' DPOptimizer add its N(0, σ²C²) noise from `gen` (PCG64, keyed by the secret seed) instead of
    a torch generator; everything else of its step (clip, sum, scale, accountant hook) is unchanged."""
    def add_noise():
        std = opt.noise_multiplier * opt.max_grad_norm
        for p in opt.params:
            _check_processed_flag(p.summed_grad)
            noise = torch.from_numpy(gen.standard_normal(tuple(p.summed_grad.shape), dtype=np.float32))
            p.grad = (p.summed_grad + (noise * std).to(p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)
    opt.add_noise = add_noise


def _empty_per_sample_grads(opt) -> None:
    """Give every parameter an empty per-sample gradient [0, *shape]: opacus then clips nothing, sums zero
    and adds the step's noise (its own empty-batch path), instead of failing on a missing grad_sample."""
    for p in opt.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
