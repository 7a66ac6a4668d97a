"""Downstream classifiers: train on (synthetic) images, test on real ones — the utility metric of
DP-LDM / DPDM / DP-Diffusion ("train on synthetic, test on real").

    model = train_classifier(x_train, y_train, arch="cnn", epochs=10, seed=0)
    acc = accuracy(model, x_test, y_test)
    res = evaluate_synthetic(x_syn, y_syn, x_test, y_test, arch="cnn", epochs=10, seeds=3)
    # {"mean": 0.93, "std": 0.004, "runs": [...], "images_per_s": ...}
    model = train_classifier(x_syn, y_syn, augment="affine")   # a fresh random affine view of each batch
    model = train_classifier(x_syn, y_syn, label_smoothing=0.1)  # targets 0.9 + 0.1/classes on the label

Images are float [N, C, H, W] in [0, 1] (see dpldm.eval.shards). No model here uses BatchNorm, so the
same architectures serve the DP-SGD baseline (per-example gradients; no batch statistics).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpldm.errors import DpldmError
from dpldm.log import log

ARCHS = ("cnn", "resnet9")
AUGMENTS = ("none", "affine")
# `affine`: each training image rotated by up to ±0.15 rad (8.6°), scaled by up to ±10%, shifted by up to ±2 of
# 28 pixels, filled with 0 (the background of MNIST-like sets). Chosen on the public proxy (docs/results.md,
# round 12): synthetic samples vary less in pose than real handwriting, and the classifier sees more of it.
AFFINE = {"rotation": 0.15, "scale": 0.10, "shift": 2 / 28}
# `label_smoothing` s: cross-entropy against (1 - s) on the image's label + s spread over all classes (Szegedy et
# al. 2016). Generated images carry some whose content does not match their label; a smoothed target keeps the
# classifier from fitting them with full confidence (chosen on the public proxy: docs/results.md, round 13).


def random_affine(images: torch.Tensor, gen: torch.Generator, rotation: float = AFFINE["rotation"],
                  scale: float = AFFINE["scale"], shift: float = AFFINE["shift"]) -> torch.Tensor:
    """Each image under its own random rotation (±`rotation` rad), scale (1 ± `scale`) and shift (±`shift` of
    the side), bilinear, zero fill; the draws come from `gen` (CPU), so a seed fixes them."""
    b = len(images)

    def draw(limit: float) -> torch.Tensor:
        return ((torch.rand(b, generator=gen) * 2 - 1) * limit).to(images.device, images.dtype)
    angle, s = draw(rotation), 1 + draw(scale)
    tx, ty = draw(2 * shift), draw(2 * shift)          # affine_grid's coordinates span [-1, 1]: the side is 2
    cos, sin = s * angle.cos(), s * angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class SmallCNN(nn.Module):
    """Tanh CNN of Papernot et al. / Tramèr & Boneh (the standard DP-SGD MNIST model), for any
    channel count and 28×28 / 32×32 inputs. `width` scales the filters (16 → 26k params on MNIST)."""

    def __init__(self, channels: int = 1, num_classes: int = 10, resolution: int = 28, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 8, stride=2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.Conv2d(width, 2 * width, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1), nn.Flatten(),
        )
        with torch.no_grad():
            n = self.features(torch.zeros(1, channels, resolution, resolution)).shape[1]
        self.head = nn.Sequential(nn.Linear(n, 32), nn.Tanh(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2 - 1))


def _conv_gn(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(16, cout // 4), cout), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_conv_gn(c, c), _conv_gn(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """ResNet-9 (Page's DAWNBench net) with GroupNorm instead of BatchNorm; 32×32 inputs (others are
    resized). `width=64` is the original; the default 32 keeps CPU training practical."""

    def __init__(self, channels: int = 3, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            _conv_gn(channels, w), _conv_gn(w, 2 * w, pool=True), _Residual(2 * w),
            _conv_gn(2 * w, 4 * w, pool=True), _conv_gn(4 * w, 8 * w, pool=True), _Residual(8 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8 * w, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 32 or x.shape[-2] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        return self.net(x * 2 - 1)


def build_classifier(arch: str, channels: int, num_classes: int, resolution: int, width: int = 0) -> nn.Module:
    """`width` 0 = the architecture's default (cnn 16, resnet9 32)."""
    if arch == "cnn":
        return SmallCNN(channels, num_classes, resolution, width or 16)
    if arch == "resnet9":
        return ResNet9(channels, num_classes, width or 32)
    raise DpldmError(f"eval.classifier must be one of {', '.join(ARCHS)}; got {arch!r}")


def _check(images: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DpldmError(f"{what}: images must be [N, 1|3, H, W]; got shape {tuple(images.shape)}")
    if len(images) != len(labels) or len(images) == 0:
        raise DpldmError(f"{what}: need as many labels as images (>0); got {len(images)} images, {len(labels)} labels")
    if labels.min() < 0:
        raise DpldmError(f"{what}: every image needs a class label (.cls); found label {int(labels.min())}")


def train_classifier(images: torch.Tensor, labels: torch.Tensor, arch: str = "cnn", epochs: int = 10,
                     seed: int = 0, batch_size: int = 128, lr: float = 2e-3, num_classes: int | None = None,
                     verbose: bool = False, augment: str = "none", label_smoothing: float = 0.0) -> nn.Module:
    """Adam + cosine schedule, cross-entropy (smoothed by `label_smoothing`); `augment` "affine" trains on
    random_affine views of each batch. Returns the model in eval mode with `model.images_per_s` set."""
    _check(images, labels, "train_classifier")
    if augment not in AUGMENTS:
        raise DpldmError(f"classifier augment must be one of {', '.join(AUGMENTS)}; got {augment!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise DpldmError(f"classifier label_smoothing must be in [0, 1); got {label_smoothing!r}")
    num_classes = num_classes or int(labels.max()) + 1
    torch.manual_seed(seed)
    model = build_classifier(arch, images.shape[1], num_classes, images.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0, seen = time.perf_counter(), 0
    for epoch in range(epochs):
        perm = torch.randperm(len(images), generator=gen)
        total = 0.0
        for i in range(0, len(images), batch_size):
            idx = perm[i:i + batch_size]
            batch = random_affine(images[idx], gen) if augment == "affine" else images[idx]
            loss = F.cross_entropy(model(batch), labels[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        if verbose:
            log(f"classifier epoch {epoch + 1}/{epochs} loss {total / len(images):.4f}", err=True)
    model.images_per_s = seen / max(time.perf_counter() - t0, 1e-9)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1]."""
    _check(images, labels, "accuracy")
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
    return correct / len(images)


def evaluate_synthetic(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                       test_labels: torch.Tensor, arch: str = "cnn", epochs: int = 10, seeds: int = 3,
                       verbose: bool = False, first_seed: int = 0, **train_kwargs) -> dict:
    """Train `seeds` classifiers (seeds first_seed..first_seed+seeds-1) on the train set, test each on the test
    set; merge_seed_results joins the results of disjoint seed ranges (e.g. run in separate processes)."""
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DpldmError(f"evaluate_synthetic: train images {tuple(train_images.shape[1:])} and test images "
                         f"{tuple(test_images.shape[1:])} differ; load both with the same channels/resolution")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    runs, speeds = [], []
    for seed in range(first_seed, first_seed + seeds):
        model = train_classifier(train_images, train_labels, arch, epochs, seed, num_classes=num_classes,
                                 **train_kwargs)
        runs.append(accuracy(model, test_images, test_labels))
        speeds.append(model.images_per_s)
        if verbose:
            log(f"{arch} seed {seed}: accuracy {runs[-1]:.4f} ({speeds[-1]:.0f} img/s training)", err=True)
    return {"arch": arch, "epochs": epochs, "augment": train_kwargs.get("augment", "none"),
            "label_smoothing": float(train_kwargs.get("label_smoothing", 0.0)),
            "n_train": len(train_images), "n_test": len(test_images), **_summary(runs, speeds)}


def _summary(runs: list[float], speeds: list[float]) -> dict:
    t = torch.tensor(runs, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(runs) > 1 else 0.0, "runs": runs,
            "images_per_s": sum(speeds) / len(speeds), "speeds": speeds}


def merge_seed_results(parts: list[dict]) -> dict:
    """One evaluate_synthetic result from results of disjoint seed ranges of the same set and protocol."""
    protocol = lambda p: (p["n_train"], p["epochs"], p["arch"], p.get("augment", "none"),  # noqa: E731
                          p.get("label_smoothing", 0.0))
    if not parts or any(protocol(p) != protocol(parts[0]) for p in parts):
        raise DpldmError("merge_seed_results: needs results of one train set and protocol")
    return {**parts[0], **_summary([r for p in parts for r in p["runs"]], [s for p in parts for s in p["speeds"]])}
