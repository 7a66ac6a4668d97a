"""Labelled image sets held in memory for evaluation, read and written through dpldm/data/shards.py.

    images, labels = load_shards("runs/x/samples/shards", channels=1, resolution=28)
    write_shards(images, labels, "out/shards")          # shard-000000.tar, ...

Images are float32 [N, C, H, W] in [0, 1]; labels int64 [N]. Evaluation sets are small enough to hold
in memory (70k MNIST images are ~220 MB), which keeps classifier training and FID simple and fast. The pixels
are the ones training sees (same decoding, channel conversion, 16-bit rescaling), mapped from [-1, 1] to [0, 1].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dpldm.data.images import from_float_chw
from dpldm.data.shards import BadSample, ShardWriter, decode_record, expand_shards, reader_records
from dpldm.errors import DpldmError


def _unit(pixels: np.ndarray) -> torch.Tensor:
    """float [C,H,W] in [-1,1] (8-bit steps) → uint8 [C,H,W], exactly the stored 8-bit values."""
    arr = from_float_chw(pixels)
    return torch.from_numpy(arr[:, :, None] if arr.ndim == 2 else arr).permute(2, 0, 1)


def load_shards(spec: str, channels: int | None = None, resolution: int | None = None,
                limit: int = 0, require_labels: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Read every sample of the shards into (images float [N,C,H,W] in [0,1], labels long [N]).

    `channels`/`resolution` convert every image (gray→RGB by repetition, RGB→gray by luminance,
    bicubic resize); by default the first image's channels and size are used for all. Samples without a
    label raise DpldmError (or get label −1 when `require_labels=False`)."""
    images, labels = [], []
    for rec in reader_records(expand_shards(spec), 0, 1):
        if isinstance(rec, BadSample):
            raise DpldmError(f"shards: {rec.message()}")
        try:
            sample = decode_record(rec, resolution, channels, "resize")
        except ValueError as e:
            raise DpldmError(f"shards: sample {rec['__key__']} in {rec['__url__']}: {e}") from None
        if require_labels and sample["label"] < 0:
            raise DpldmError(f"shards: sample {rec['__key__']} in {rec['__url__']} has no .cls label "
                             "(needed for classifiers)")
        t = _unit(sample["pixels"])
        if not images:  # the first image fixes the format of all others
            channels = t.shape[0]
            resolution = resolution or (t.shape[1] if t.shape[1] == t.shape[2] else None)
        if images and t.shape != images[0].shape:
            raise DpldmError(f"shards: sample {sample['key']} has shape {tuple(t.shape)}, the first had "
                             f"{tuple(images[0].shape)}; pass resolution= to resize all")
        images.append(t)
        labels.append(sample["label"])
        if limit and len(images) >= limit:
            break
    if not images:
        raise DpldmError(f"shards: {spec} holds no samples")
    x = torch.stack(images).float().div_(255.0)
    return x, torch.tensor(labels, dtype=torch.long)


def write_shards(images: torch.Tensor, labels: torch.Tensor, out_dir: str | Path,
                 shard_size: int = 10000, texts: list[str] | None = None, prefix: str = "shard") -> list[str]:
    """Write images (float [N,C,H,W] in [0,1] or uint8) + labels as PNG/cls(/txt) webdataset shards."""
    if images.dtype != torch.uint8:
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    with ShardWriter(out_dir, f"{prefix}-%06d.tar", maxcount=shard_size) as sink:
        for i in range(len(images)):
            arr = images[i].permute(1, 2, 0).numpy()
            sink.write(f"{i:09d}", arr[:, :, 0] if arr.shape[2] == 1 else arr, label=int(labels[i]),
                       text=texts[i] if texts is not None else None)
    return sink.paths
