"""Streaming reader for webdataset shards (img2dataset layout, any writer).

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

import glob
import json
import os
import random
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from dpldm.data.images import (IMAGE_EXTENSIONS, TRANSFORMS, convert_channels, decode_image,
                               fit_resolution, to_float_chw)
from dpldm.errors import DpldmError


class BadSampleWarning(UserWarning):
    """A public sample was skipped (shard and key in the message)."""


@dataclass
class BadSample:
    shard: str
    key: str
    reason: str

    def message(self) -> str:
        return f"shard {self.shard}, key {self.key}: {self.reason}"


class _ShardBroken(Exception):
    def __init__(self, key: str, reason: str):
        super().__init__(reason)
        self.key, self.reason = key, reason


# -- shard lists ---------------------------------------------------------------------------------

def expand_shards(pattern: str) -> list[str]:
    """Shard URLs of a directory, brace pattern, glob, `a::b` list or pipe: URL."""
    if not pattern:
        raise DpldmError("data: no shards given (empty path; set data.public / data.private / data.test)")
    if os.path.isdir(pattern):
        shards = sorted(str(p) for p in Path(pattern).glob("*.tar"))
        if not shards:
            raise DpldmError(f"data: directory {pattern} holds no *.tar shards")
        return shards
    shards = []
    for url in expand_urls(pattern):
        if url.startswith("pipe:") or "://" in url:
            shards.append(url)
        elif any(c in url for c in "*?["):
            matched = sorted(glob.glob(url))
            if not matched:
                raise DpldmError(f"data: pattern {url} matches no files")
            shards.extend(matched)
        elif not os.path.isfile(url):
            raise DpldmError(f"data: shard {url} does not exist (from {pattern})")
        else:
            shards.append(url)
    return shards


def _read_shard(url: str) -> Iterator[dict]:
    """Raw records {"__key__", "__url__", ext: bytes} of one shard; _ShardBroken on a bad tar."""
    last_key, current = "(start of shard)", None
    stream, completed = None, False
    try:
        stream = gopen(url, "rb")
        tar = tarfile.open(fileobj=stream, mode="r|*")
        for info in tar:
            if not info.isreg():
                continue
            name = info.name
            if "/" not in name and name.startswith("__") and name.endswith("__"):
                continue
            prefix, suffix = base_plus_ext(name)
            if prefix is None:
                continue
            data = tar.extractfile(info).read()
            tar.members = []
            if current is not None and prefix != current["__key__"]:
                last_key = current["__key__"]
                yield current
                current = None
            if current is None:
                current = {"__key__": prefix, "__url__": url}
            current[suffix.lower()] = data
        if current is not None:
            last_key = current["__key__"]
            yield current
            current = None
        completed = True
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as e:
        where = f"at key {current['__key__']}" if current is not None else f"after key {last_key}"
        raise _ShardBroken(current["__key__"] if current is not None else last_key,
                           f"unreadable tar {where} ({type(e).__name__}: {e})") from None
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception as e:  # a pipe: command that exited non-zero
                if completed:
                    raise _ShardBroken(last_key, f"reading failed ({type(e).__name__}: {e})") from None


def _records(url: str) -> Iterator[dict | BadSample]:
    try:
        yield from _read_shard(url)
    except _ShardBroken as e:
        yield BadSample(url, e.key, e.reason)


def reader_records(shards: list[str], reader: int, readers: int) -> Iterator[dict | BadSample]:
    """The records of reader `reader` of `readers` under the splitting rule in the module docstring."""
    whole = len(shards) // readers * readers
    for url in shards[reader:whole:readers]:
        yield from _records(url)
    j = 0
    for url in shards[whole:]:
        for rec in _records(url):
            if isinstance(rec, BadSample):
                if j % readers == reader:  # one reader reports a leftover shard's failure
                    yield rec
                continue
            if j % readers == reader:
                yield rec
            j += 1


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


# -- decoding --------------------------------------------------------------------------------------

def record_label(rec: dict) -> Optional[int]:
    if "cls" in rec:
        try:
            return int(rec["cls"].decode("utf-8").strip())
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f".cls is not an integer ({rec['cls'][:20]!r})") from None
    if "json" in rec:
        try:
            label = json.loads(rec["json"]).get("label")
        except (ValueError, AttributeError):
            return None
        if isinstance(label, int) and not isinstance(label, bool):
            return label
    return None


def record_text(rec: dict) -> str:
    for ext in ("txt", "caption"):
        if ext in rec:
            return rec[ext].decode("utf-8", errors="replace").strip()
    if "json" in rec:
        try:
            caption = json.loads(rec["json"]).get("caption")
        except (ValueError, AttributeError):
            return ""
        return caption if isinstance(caption, str) else ""
    return ""


def decode_record(rec: dict, resolution: Optional[int], channels: Optional[int], transform: str = "resize",
                  require_label: bool = False) -> dict:
    """Raw record → {"pixels": float32 [C,H,W] in [-1,1], "label", "text", "key", "shard"}.
    resolution/channels None keep the image's own. ValueError for bad data, DpldmError for a config
    that cannot apply (e.g. 4 channels from a gray image)."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in rec), None)
    if ext is None:
        raise ValueError(f"no image in the sample (looked for .{', .'.join(IMAGE_EXTENSIONS)})")
    label = record_label(rec)
    if label is None:
        if require_label:
            raise ValueError("missing .cls label (labels are required here)")
        label = -1
    try:
        img = decode_image(rec[ext])
    except Exception as e:
        raise ValueError(f".{ext} is not a decodable image ({type(e).__name__})") from None
    if channels is None:
        channels = 1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    img = convert_channels(img, channels)
    if resolution is not None:
        img = fit_resolution(img, resolution, transform)
    return {"pixels": to_float_chw(img), "label": label, "text": record_text(rec),
            "key": rec["__key__"], "shard": rec["__url__"]}


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
    from dpldm.config import DataConfig
    data_cfg = data_cfg or DataConfig()
    _check(data_cfg, resolution, channels, 1, 0, 1)
    ds = ShardDataset(expand_shards(pattern), resolution, channels, transform=data_cfg.transform,
                      shuffle=False, require_label=require_label, batched=False)
    yield from ShardStream(ds, 0, private, data_cfg.on_error)


def _tar_names(path: str) -> Iterator[str]:
    """Member names of a plain (uncompressed) tar, read from headers only (skipping data by seek):
    much faster than tarfile on shards of tiny files. Handles ustar prefixes, GNU long names, pax paths."""
    with open(path, "rb") as f:
        size_total = os.fstat(f.fileno()).st_size
        long_name = None
        while True:
            header = f.read(512)
            if len(header) < 512 or header == bytes(512):
                if len(header) and len(header) < 512:
                    raise tarfile.ReadError("unexpected end of data")
                return
            if sum(header) - sum(header[148:156]) + 256 != tarfile.nti(header[148:156]):
                raise tarfile.ReadError(f"bad header checksum at byte {f.tell() - 512}")
            size = tarfile.nti(header[124:136])
            kind = header[156:157]
            padded = (size + 511) // 512 * 512
            if f.tell() + padded > size_total:
                raise tarfile.ReadError("unexpected end of data")
            if kind in (b"L", b"x", b"g"):
                data = f.read(padded)[:size]
                if kind == b"L":
                    long_name = data.rstrip(b"\0").decode("utf-8", "replace")
                elif kind == b"x":
                    for rec in data.split(b"\n"):
                        if b" path=" in rec:
                            long_name = rec.split(b" path=", 1)[1].decode("utf-8", "replace")
                continue
            name = header[:100].rstrip(b"\0").decode("utf-8", "replace")
            prefix = header[345:500].rstrip(b"\0").decode("utf-8", "replace") if header[257:262] == b"ustar" else ""
            if prefix:
                name = prefix + "/" + name
            if long_name is not None:
                name, long_name = long_name, None
            f.seek(padded, 1)
            if kind in (b"0", b"\0", b"7"):
                yield name


def count_samples(pattern: str) -> int:
    """Number of samples (distinct consecutive keys) in all shards; DpldmError on an unreadable shard."""
    total = 0
    for url in expand_shards(pattern):
        try:
            if url.startswith("pipe:") or "://" in url:
                total += sum(1 for _ in _read_shard(url))
                continue
            with open(url, "rb") as f:
                plain = f.read(262)[257:262] == b"ustar"
            names = _tar_names(url) if plain else (m.name for m in tarfile.open(url, "r:*") if m.isreg())
            last = None
            for name in names:
                if "/" not in name and name.startswith("__") and name.endswith("__"):
                    continue
                prefix, _ = base_plus_ext(name)
                if prefix is not None and prefix != last:
                    total, last = total + 1, prefix
        except _ShardBroken as e:
            raise DpldmError(f"shard {url}, key {e.key}: {e.reason}") from None
        except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as e:
            raise DpldmError(f"shard {url}: unreadable tar ({type(e).__name__}: {e})") from None
    return total


def manifest_count(pattern: str) -> Optional[int]:
    """The sample count `dpldm data pack` recorded in DIR/dataset.json for a shard directory (None: no manifest,
    e.g. shards written by another tool, or a pattern rather than a directory)."""
    meta = Path(pattern) / "dataset.json"
    if "://" in pattern or pattern.startswith("pipe:") or not meta.is_file():
        return None
    try:
        return int(json.loads(meta.read_text())["count"])
    except (ValueError, KeyError, TypeError) as e:
        raise DpldmError(f"{meta}: malformed pack manifest (expected a 'count'; {e})") from None


def check_complete(pattern: str, read: int, log=print) -> None:
    """DpldmError when a private set yielded fewer or more samples than its pack manifest counts (shards copied
    half-way, a full node-local disk): training on what is left would silently change N. Without a manifest, a
    notice says the count cannot be checked."""
    expected = manifest_count(pattern)
    if expected is None:
        log(f"data: {pattern} has no dataset.json manifest: its sample count ({read}) cannot be checked")
    elif read != expected:
        raise DpldmError(f"data: read {read} samples from {pattern} but its dataset.json counts {expected}: the "
                         "shards are truncated or incomplete (copied half-way? a disk filled up?); re-copy or re-pack")
