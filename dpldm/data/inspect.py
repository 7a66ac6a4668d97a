"""`dpldm data inspect SHARDS`: sample count, class histogram, image sizes and modes, caption count,
unreadable samples, what is missing against the pack manifest (DIR/dataset.json: the set's count and each
shard's), and a grid PNG of the first images (default DIR/inspect_grid.png).

Its outputs are the data itself: the grid shows real images and the histogram is an exact, un-noised statistic
of the set. On private data both are private and must never be published (docs/privacy.md, "Release checklist");
every run prints PRIVATE_OUTPUT_WARNING. A set marked private (`"private": true` in DIR/dataset.json) gets no
default grid: pass --grid PATH to write one, to a private place.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from dpldm.data.images import IMAGE_EXTENSIONS, decode_image, make_grid
from dpldm.data.shards import BadSample, expand_shards, reader_records, record_label, record_text
from dpldm.errors import DpldmError
from dpldm.log import log


PRIVATE_OUTPUT_WARNING = ("data inspect: WARNING: the grid shows real images and the histogram exact label counts; "
                          "for private data both are private: never publish them")


def _manifest(pattern: str, shards: list[str]) -> dict:
    """The set's dataset.json (next to the shards) as a dict; {} when there is none or it is unreadable."""
    base = pattern if os.path.isdir(pattern) else os.path.dirname(shards[0]) if shards else ""
    meta = Path(base) / "dataset.json"
    if not base or not meta.is_file():
        return {}
    try:
        found = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return {}
    return found if isinstance(found, dict) else {}


def marked_private(pattern: str, shards: list[str]) -> bool:
    """True when the set's dataset.json (next to the shards) says `"private": true`."""
    return _manifest(pattern, shards).get("private") is True


def _against_manifest(manifest: dict, shards: list[str], per_shard: Counter) -> dict:
    """What the manifest counts and what is missing from it: {"expected", "missing", "short": [(shard, read,
    expected)]} (expected None without a manifest count; per-shard rows only where the manifest has them)."""
    expected = manifest.get("count") if isinstance(manifest.get("count"), int) else None
    counts = manifest.get("shard_counts") if isinstance(manifest.get("shard_counts"), dict) else {}
    wanted = {url: counts.get(os.path.basename(url)) for url in shards}
    short = [(url, per_shard[url], n) for url, n in wanted.items() if isinstance(n, int) and per_shard[url] != n]
    read = sum(per_shard.values())
    return {"expected": expected, "missing": max(expected - read, 0) if expected is not None else None,
            "short": short}


def inspect_shards(pattern: str, grid_path: str = "", grid_count: int = 64) -> dict:
    """Read every sample once (undecoded sizes come from the image headers); returns the summary.
    grid_path "" = DIR/inspect_grid.png, or no grid at all when the set is marked private."""
    shards = expand_shards(pattern)
    manifest = _manifest(pattern, shards)
    private = manifest.get("private") is True
    per_shard: Counter = Counter()
    labels: Counter = Counter()
    sizes: Counter = Counter()
    count = captions = unlabeled = 0
    bad: list[BadSample] = []
    grid_images = []
    for rec in reader_records(shards, 0, 1):
        if isinstance(rec, BadSample):
            bad.append(rec)
            continue
        ext = next((e for e in IMAGE_EXTENSIONS if e in rec), None)
        try:
            if ext is None:
                raise ValueError("no image in the sample")
            img = decode_image(rec[ext])
            label = record_label(rec)
        except Exception as e:
            bad.append(BadSample(rec["__url__"], rec["__key__"], str(e) or type(e).__name__))
            continue
        count += 1
        per_shard[rec["__url__"]] += 1
        sizes[f"{img.size[0]}x{img.size[1]} {img.mode} .{ext}"] += 1
        if label is None:
            unlabeled += 1
        else:
            labels[label] += 1
        if record_text(rec):
            captions += 1
        if len(grid_images) < grid_count:
            grid_images.append(img)
    if grid_path == "" and not private:
        if os.path.isdir(pattern):
            base = pattern
        else:
            base = os.path.dirname(shards[0]) if not shards[0].startswith("pipe:") else "."
        grid_path = os.path.join(base, "inspect_grid.png")
    if grid_images and grid_path:
        Path(grid_path).parent.mkdir(parents=True, exist_ok=True)
        make_grid(grid_images).save(grid_path)
    elif count == 0 and not bad:
        raise DpldmError(f"data inspect: {pattern} holds no samples")
    return {"shards": len(shards), "count": count, "labels": dict(sorted(labels.items())),
            "unlabeled": unlabeled, "captions": captions, "sizes": dict(sizes.most_common()),
            "bad": bad, "grid": grid_path if grid_images and grid_path else "", "private": private,
            **_against_manifest(manifest, shards, per_shard)}


def format_summary(s: dict) -> str:
    lines = [f"shards:   {s['shards']}", f"samples:  {s['count']}"]
    if s["labels"]:
        lines.append("classes:  " + ", ".join(f"{k}: {v}" for k, v in s["labels"].items()))
    if s["unlabeled"]:
        lines.append(f"no label: {s['unlabeled']}")
    lines.append(f"captions: {s['captions']}")
    lines.append("images:   " + ", ".join(f"{k} ({v})" for k, v in s["sizes"].items()))
    if s.get("expected") is None:
        lines.append("expected: unknown (no dataset.json pack manifest: the count cannot be checked)")
    elif s["missing"] or s["short"]:
        lines.append(f"expected: {s['expected']} (dataset.json); MISSING: {s['missing']} samples not read")
    else:
        lines.append(f"expected: {s['expected']} (dataset.json): all read")
    for url, read, expected in s.get("short", []):
        lines.append(f"TRUNCATED: {url}: read {read} of the {expected} samples the manifest counts")
    if s["bad"]:
        lines.append(f"unreadable: {len(s['bad'])}, first: {s['bad'][0].message()}")
    if s["grid"]:
        lines.append(f"grid:     {s['grid']} (real images: private if the set is)")
    elif s.get("private"):
        lines.append("grid:     not written: the set is marked private (dataset.json); --grid PATH writes one")
    return "\n".join(lines)


def main(args) -> int:
    log(PRIVATE_OUTPUT_WARNING, err=True)
    log(format_summary(inspect_shards(args.shards, args.grid)))
    return 0
