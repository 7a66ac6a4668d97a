"""`dpldm data pack SOURCE --out DIR`: write webdataset shards in the img2dataset layout.

Each sample `<key>` (9-digit running number) holds `<key>.png|jpg`, `<key>.cls` (label as text, when
known), `<key>.txt` (caption, when there is one) and `<key>.json` (source, index, width, height,
label, caption). `DIR/dataset.json` is written last: source, split, count, class names, label
histogram, shard names and each shard's sample count (`shard_counts`: readers check what they read against
them). Re-running the same command on a finished DIR does nothing.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from dpldm.data.shards import ShardWriter
from dpldm.data.sources import open_source
from dpldm.errors import DpldmError
from dpldm.log import log

SHARD_PATTERN = "shard-%06d.tar"


def _record_size(image) -> tuple[int, int]:
    if isinstance(image, np.ndarray):
        return int(image.shape[1]), int(image.shape[0])
    return image.size


def pack(source: str, out: str | Path, *, split: str = "train", shard_size: int = 10000, limit: int = 0,
         fmt: str = "png", overwrite: bool = False, workers: int = 0, verbose: bool = True,
         private: bool = False) -> dict:
    """Pack SOURCE into OUT/shard-NNNNNN.tar (shards written in parallel by `workers` spawned
    processes; 0 = one per CPU, at most 8); returns the dataset.json contents. `private` marks the set
    private in dataset.json (`dpldm data inspect` then writes no grid of its images by default)."""
    if shard_size < 1:
        raise DpldmError(f"--shard-size must be a positive number of samples; got {shard_size}")
    if limit < 0:
        raise DpldmError(f"--limit must be >= 0 (0 = all); got {limit}")
    if workers < 0:
        raise DpldmError(f"--workers must be >= 0 (0 = one per CPU); got {workers}")
    if fmt not in ("png", "jpg"):
        raise DpldmError(f"--format must be png or jpg; got {fmt!r}")
    out = Path(out)
    request = {"source": source, "split": split, "limit": limit, "format": fmt, "shard_size": shard_size}
    meta_path = out / "dataset.json"
    existing = sorted(out.glob("shard-*.tar")) if out.is_dir() else []
    if meta_path.exists() or existing:
        done = _finished(meta_path, request)
        if done is not None and not overwrite:
            if verbose:
                log(f"{out}: already packed ({done['count']} samples); nothing to do")
            if private and not done.get("private"):
                done["private"] = True
                meta_path.write_text(json.dumps(done, indent=1))
            return done
        if not overwrite:
            raise DpldmError(f"--out {out} already holds shards of a different or unfinished pack; "
                             "choose another directory or pass --overwrite")
        for f in existing:
            f.unlink()
        meta_path.unlink(missing_ok=True)

    src = open_source(source, split)
    total = min(len(src), limit) if limit else len(src)
    out.mkdir(parents=True, exist_ok=True)
    # An integer mtime keeps tarfile from adding a pax header to every member (it does for float times).
    mtime = int(time.time())
    tasks = [(k, a, min(a + shard_size, total), out, fmt, split, mtime)
             for k, a in enumerate(range(0, total, shard_size))]
    workers = workers or min(os.cpu_count() or 1, len(tasks), 8)
    hist: Counter = Counter()
    sizes: Counter = Counter()
    captions: Counter = Counter()
    done = 0
    t0 = time.time()
    global _SOURCE
    _SOURCE = src  # the serial path reads it; spawned workers open their own copy (_open_in_worker)
    try:
        if workers > 1 and len(tasks) > 1:
            # spawn, not fork: forking a process that runs torch/OpenMP threads can deadlock the child
            with multiprocessing.get_context("spawn").Pool(workers, initializer=_open_in_worker,
                                                          initargs=(source, split)) as pool:
                results = pool.imap_unordered(_write_shard, tasks)
                for stats in results:
                    done = _merge(stats, (hist, sizes, captions), done, total, t0, verbose)
        else:
            for task in tasks:
                done = _merge(_write_shard(task), (hist, sizes, captions), done, total, t0, verbose)
    finally:
        _SOURCE = None
    shards = sorted(p.name for p in out.glob("shard-*.tar"))
    meta = {
        **request,
        "count": total,
        "class_names": src.class_names,
        "label_histogram": {str(k): hist[k] for k in sorted(hist)},
        "captions": captions["txt"],
        "sizes": dict(sizes),
        "shards": shards,
        "shard_counts": {SHARD_PATTERN % k: b - a for k, a, b, *_ in tasks},
        "private": bool(private),
    }
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(meta_path)
    if verbose:
        dt = time.time() - t0
        log(f"{out}: {total} samples in {len(shards)} shards ({dt:.1f} s, {total / max(dt, 1e-9):.0f} img/s, "
              f"{workers} process{'es' if workers > 1 else ''})")
    return meta


_SOURCE = None


def _open_in_worker(source: str, split: str) -> None:
    global _SOURCE
    _SOURCE = open_source(source, split)


def _write_shard(task) -> tuple[Counter, Counter, Counter]:
    """Write samples [start, stop) of the source as shard number `shard` (one ShardWriter shard)."""
    shard, start, stop, out, fmt, split, mtime = task
    src = _SOURCE
    hist: Counter = Counter()
    sizes: Counter = Counter()
    captions: Counter = Counter()
    with ShardWriter(out, SHARD_PATTERN, maxcount=stop - start, start_shard=shard, mtime=mtime) as sink:
        for n in range(start, stop):
            rec = src.record(n)
            w, h = _record_size(rec.image)
            if rec.label is not None:
                hist[int(rec.label)] += 1
            if rec.caption is not None:
                captions["txt"] += 1
            sink.write(f"{n:09d}", rec.image, fmt=fmt, label=rec.label, text=rec.caption,
                       meta={"source": src.name, "split": split, "index": rec.index, "origin": rec.origin,
                             "width": w, "height": h, "label": rec.label, "caption": rec.caption})
            sizes[f"{w}x{h}"] += 1
    return hist, sizes, captions


def _merge(stats, into, done: int, total: int, t0: float, verbose: bool) -> int:
    """Add one shard's (label histogram, sizes, caption count) counters; report progress."""
    for acc, part in zip(into, stats):
        acc.update(part)
    done += sum(stats[1].values())
    if verbose:
        log(f"  packed {done}/{total} ({done / max(time.time() - t0, 1e-9):.0f} img/s)", err=True)
    return done


def _finished(meta_path: Path, request: dict) -> dict | None:
    """The existing dataset.json if it records the same request and all its shards exist."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if any(meta.get(k) != v for k, v in request.items()):
        return None
    if not all((meta_path.parent / s).exists() for s in meta.get("shards", [])):
        return None
    return meta


def main(args) -> int:
    pack(args.source, args.out, split=args.split, shard_size=args.shard_size, limit=args.limit,
         fmt=args.format, overwrite=getattr(args, "overwrite", False), workers=getattr(args, "workers", 0),
         private=getattr(args, "private", False))
    return 0
