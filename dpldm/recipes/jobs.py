"""Independent jobs of a recipe in worker processes: `run_jobs([(name, fn, args), ...])`.

On a small CPU host one process using every core is not the fastest way through several independent jobs: the
quickstart's models are small, and their kernels do not scale with intra-op threads. Measured on 2 cores
(`benchmarks/threads_vs_processes.py`, docs/benchmarks.md, two runs): two one-thread processes do 1.33-1.37x the
U-Net training work, 1.12-1.19x the classifier training work and 0.99-1.27x the sampling work of one two-thread
process. The threads of all processes together must not exceed the cores: oversubscribed, OpenMP's spinning threads
slowed a sampler here ~10x (0.86 s -> ~10 s per batch of 250 while a two-process test ran beside it).
Jobs are spawned (not forked: forking a process that has run torch's OpenMP threads can deadlock the child),
so `fn` must be a module-level function and its arguments picklable. Each job reads and writes its own files
(run directories are resumed by re-running), so a failed job loses nothing the others did.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

import torch


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_jobs(jobs: list[tuple[str, Callable, tuple]], workers: int = 2) -> list:
    """[fn(*args) for each (name, fn, args)], run by `workers` spawned processes of cpu_count // workers threads
    each, in order of submission (`name` says what the job is, for whoever reads the call). A failed job raises once
    the other jobs have finished."""
    workers = max(1, min(workers, os.cpu_count() or 1, len(jobs)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = [pool.submit(fn, *args) for _, fn, args in jobs]
        return [future.result() for future in futures]
