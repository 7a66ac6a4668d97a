"""Mixed precision for the public, non-private compute (sampling): bf16 autocast where the device runs it natively.

`precision` is "auto" | "bf16" | "fp32". "auto" means bf16 on a CUDA device that supports it and on a CPU with
native bf16 instructions (AMX or AVX512-BF16, where oneDNN's bf16 convolutions run 3-4x faster than fp32 ones:
the quickstart's LoDA sampling 1.6x end to end, docs/benchmarks.md "Sampling precision"); fp32 elsewhere (a CPU
without them emulates bf16, slower than fp32). Weights stay fp32; autocast runs matmuls and convolutions in bf16.
The DP step never uses it: its time is in the fp32 per-example bookkeeping, where bf16 measured no gain.
"""
from __future__ import annotations

import contextlib

import torch

from dpldm.errors import DpldmError

PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16(device_type: str) -> bool:
    """True when `device_type` ("cuda" / "cpu") computes bf16 matmuls and convolutions in hardware."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return False


def resolve(precision: str, device_type: str) -> str:
    """"bf16" or "fp32" for this device ("auto" decided by native_bf16)."""
    if precision not in PRECISIONS:
        raise DpldmError(f"sample.precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device_type) else "fp32"
    return precision


def autocast(precision: str, device_type: str):
    """A context in which the model runs at `precision` (resolved first): bf16 autocast, or nothing."""
    if resolve(precision, device_type) == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
