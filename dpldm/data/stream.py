"""Streaming batches from webdataset shards for training (records are read and decoded by dpldm/data/shards.py).

    for batch in stream_loader("data/mnist", cfg.data, 32, 3, batch_size=64, rank=r, world_size=w, epoch=e):
        batch["pixels"]  # float32 [B,C,H,W] in [-1,1];  batch["label"] int64 [B] (-1 = none)
        batch["text"], batch["key"]  # list[str]

Shards: a directory (all *.tar, sorted), brace pattern, glob, `a::b` list or `pipe:CMD` URL (webdataset's
gopen). Splitting (each sample once per epoch over ranks × DataLoader workers; T readers, reader g): the
shard list is shuffled identically on all ranks (seed, epoch); the first ⌊S/T⌋·T shards are dealt out
whole (shard i to reader i mod T); every reader reads the S mod T leftover shards and keeps leftover
record j when j mod T = g; then a shuffle buffer, decode, batches (last partial batch kept).
Bad input: public data is skipped, listed in `loader.skipped` and warned about with shard and key
(`data.on_error: raise` makes it fatal); private data always raises DpldmError naming shard and key,
since silently dropping private examples changes the N the accountant uses. Details: docs/data.md.
"""
from __future__ import annotations

import random
import warnings
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dpldm.config import DataConfig
from dpldm.data.images import TRANSFORMS
from dpldm.data.shards import BadSample, BadSampleWarning, decode_record, expand_shards, reader_records
from dpldm.errors import DpldmError


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Shuffle buffer: holds `size` records, emits a random one per new arrival. Events pass through."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        if isinstance(item, BadSample):
            yield item
            continue
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


# -- datasets --------------------------------------------------------------------------------------

class ShardDataset(IterableDataset):
    """Yields batches (dicts) and BadSample events of one rank; splits itself over DataLoader workers."""

    def __init__(self, shards: list[str], resolution: Optional[int], channels: Optional[int], *,
                 transform: str = "resize", batch_size: int = 1, rank: int = 0, world_size: int = 1,
                 epoch: int = 0, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 0,
                 require_label: bool = False, batched: bool = True):
        self.shards, self.resolution, self.channels = list(shards), resolution, channels
        self.transform, self.batch_size, self.rank, self.world_size = transform, batch_size, rank, world_size
        self.epoch, self.seed, self.shuffle, self.shuffle_buffer = epoch, seed, shuffle, shuffle_buffer
        self.require_label, self.batched = require_label, batched

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        shards = list(self.shards)
        if self.shuffle:
            random.Random(f"shards:{self.seed}:{self.epoch}").shuffle(shards)  # same order on every rank
        records = reader_records(shards, reader, readers)
        if self.shuffle:
            rng = random.Random(f"buffer:{self.seed}:{self.epoch}:{reader}")
            records = _shuffled(records, self.shuffle_buffer, rng)
        batch: list[dict] = []
        for rec in records:
            if isinstance(rec, BadSample):
                yield rec
                continue
            try:
                sample = decode_record(rec, self.resolution, self.channels, self.transform, self.require_label)
            except ValueError as e:
                yield BadSample(rec["__url__"], rec["__key__"], str(e))
                continue
            if not self.batched:
                yield sample
                continue
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        if batch:
            yield collate(batch)


def collate(samples: list[dict]) -> dict:
    return {
        "pixels": torch.from_numpy(np.stack([s["pixels"] for s in samples])),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "text": [s["text"] for s in samples],
        "key": [s["key"] for s in samples],
    }


class ShardStream:
    """The iterable `stream_loader` returns; `skipped` lists the public samples it dropped."""

    def __init__(self, dataset: ShardDataset, num_workers: int, private: bool, on_error: str):
        self.dataset, self.num_workers, self.private, self.on_error = dataset, num_workers, private, on_error
        self.skipped: list[BadSample] = []

    def __iter__(self):
        if self.num_workers > 0:
            # spawn, not fork: a forked worker of a process whose OpenMP pool is running can hang forever
            items = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                               pin_memory=torch.cuda.is_available(), multiprocessing_context="spawn",
                               persistent_workers=False)
        else:
            items = iter(self.dataset)
        for item in items:
            if isinstance(item, BadSample):
                self._bad(item)
                continue
            yield item

    def _bad(self, bad: BadSample) -> None:
        if self.private:
            raise DpldmError(f"private data: {bad.message()} (private examples are never skipped: "
                             "fix or remove the sample and re-pack)")
        if self.on_error == "raise":
            raise DpldmError(f"{bad.message()} (data.on_error=raise)")
        self.skipped.append(bad)
        warnings.warn(f"skipped {bad.message()} [{len(self.skipped)} skipped so far]", BadSampleWarning,
                      stacklevel=2)


def _check(data_cfg, resolution, channels, batch_size, rank, world_size) -> None:
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
        raise DpldmError(f"data: resolution must be a positive int; got {resolution!r}")
    if channels is not None and channels not in (1, 3, 4):
        raise DpldmError(f"data: channels must be 1 (gray), 3 (RGB) or 4 (RGBA); got {channels!r}")
    if batch_size < 1:
        raise DpldmError(f"data: batch_size must be >= 1; got {batch_size}")
    if not (world_size >= 1 and 0 <= rank < world_size):
        raise DpldmError(f"data: rank must be in [0, world_size={world_size}); got {rank}")
    if data_cfg.transform not in TRANSFORMS:
        raise DpldmError(f"data.transform must be one of {', '.join(TRANSFORMS)}; got {data_cfg.transform!r}")
    if data_cfg.on_error not in ("skip", "raise"):
        raise DpldmError(f"data.on_error must be skip or raise; got {data_cfg.on_error!r}")
    if data_cfg.num_workers < 0:
        raise DpldmError(f"data.num_workers must be >= 0; got {data_cfg.num_workers}")


def stream_loader(pattern: str, data_cfg, resolution: int, channels: int, *, batch_size: int,
                  rank: int = 0, world_size: int = 1, epoch: int = 0, seed: int = 0, private: bool = False,
                  shuffle: bool = True, require_label: bool = False) -> ShardStream:
    """Batches of one rank for one epoch (see the module docstring for splitting and error policy)."""
    _check(data_cfg, resolution, channels, batch_size, rank, world_size)
    ds = ShardDataset(expand_shards(pattern), resolution, channels, transform=data_cfg.transform,
                      batch_size=batch_size, rank=rank, world_size=world_size, epoch=epoch, seed=seed,
                      shuffle=shuffle, shuffle_buffer=data_cfg.shuffle_buffer, require_label=require_label)
    return ShardStream(ds, data_cfg.num_workers, private, data_cfg.on_error)


def iterate_samples(pattern: str, data_cfg=None, resolution: Optional[int] = None,
                    channels: Optional[int] = None, *, private: bool = False,
                    require_label: bool = False) -> Iterator[dict]:
    """Single decoded samples in file order (no shuffling, one process): {"pixels" float32 [C,H,W] in
    [-1,1], "label", "text", "key", "shard"}. resolution/channels None keep each image's own."""
    data_cfg = data_cfg or DataConfig()
    _check(data_cfg, resolution, channels, 1, 0, 1)
    ds = ShardDataset(expand_shards(pattern), resolution, channels, transform=data_cfg.transform,
                      shuffle=False, require_label=require_label, batched=False)
    yield from ShardStream(ds, 0, private, data_cfg.on_error)
