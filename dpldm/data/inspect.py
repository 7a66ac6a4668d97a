"""`dpldm data inspect SHARDS`: sample count, class histogram, image sizes and modes, caption count,
unreadable samples, and a grid PNG of the first images (default DIR/inspect_grid.png)."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from dpldm.data.images import IMAGE_EXTENSIONS, decode_image, make_grid
from dpldm.data.stream import BadSample, expand_shards, reader_records, record_label, record_text
from dpldm.errors import DpldmError


def inspect_shards(pattern: str, grid_path: str = "", grid_count: int = 64) -> dict:
    """Read every sample once (undecoded sizes come from the image headers); returns the summary."""
    shards = expand_shards(pattern)
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
        sizes[f"{img.size[0]}x{img.size[1]} {img.mode} .{ext}"] += 1
        if label is None:
            unlabeled += 1
        else:
            labels[label] += 1
        if record_text(rec):
            captions += 1
        if len(grid_images) < grid_count:
            grid_images.append(img)
    if grid_path == "":
        base = pattern if os.path.isdir(pattern) else os.path.dirname(shards[0]) if not shards[0].startswith("pipe:") else "."
        grid_path = os.path.join(base, "inspect_grid.png")
    if grid_images:
        Path(grid_path).parent.mkdir(parents=True, exist_ok=True)
        make_grid(grid_images).save(grid_path)
    elif count == 0 and not bad:
        raise DpldmError(f"data inspect: {pattern} holds no samples")
    return {"shards": len(shards), "count": count, "labels": dict(sorted(labels.items())),
            "unlabeled": unlabeled, "captions": captions, "sizes": dict(sizes.most_common()),
            "bad": bad, "grid": grid_path if grid_images else ""}


def format_summary(s: dict) -> str:
    lines = [f"shards:   {s['shards']}", f"samples:  {s['count']}"]
    if s["labels"]:
        lines.append("classes:  " + ", ".join(f"{k}: {v}" for k, v in s["labels"].items()))
    if s["unlabeled"]:
        lines.append(f"no label: {s['unlabeled']}")
    lines.append(f"captions: {s['captions']}")
    lines.append("images:   " + ", ".join(f"{k} ({v})" for k, v in s["sizes"].items()))
    if s["bad"]:
        lines.append(f"unreadable: {len(s['bad'])}, first: {s['bad'][0].message()}")
    if s["grid"]:
        lines.append(f"grid:     {s['grid']}")
    return "\n".join(lines)


def main(args) -> int:
    print(format_summary(inspect_shards(args.shards, args.grid)))
    return 0
