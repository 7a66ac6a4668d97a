"""Shared helpers for benchmarks: machine description, medians, and writing a section of docs/benchmarks.md."""
from __future__ import annotations

import os
import platform
import re
import statistics
import time
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    import torch
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{dev}, torch {torch.__version__}, Python {platform.python_version()}"


def median_time(fn, repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_section(title: str, body: str) -> None:
    """Replace (or append) the `## title` section of docs/benchmarks.md, stamped with date and machine."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    header = "# Benchmarks\n\nFigures printed by `make bench` (benchmarks/run_all.py).\n"
    text = DOC.read_text() if DOC.exists() else header
    stamp = f"_measured {time.strftime('%Y-%m-%d')} on {machine()}_\n\n"
    section = f"## {title}\n\n{stamp}{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda m: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    DOC.write_text(text)
