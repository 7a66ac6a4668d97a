"""The one Trainer: loop, progress line, checkpoints, resume-by-rerun, clean exit on SIGUSR1/SIGTERM.

Subclasses (pretrain, DP fine-tune) override `train_step(step) -> metrics` and, for state beyond the
trainable weights and the optimizer, `extra_state()` / `load_extra_state(state)` and `on_checkpoint(step)`.
Progress is counted in logical steps and samples (EDM2); re-running the same command resumes from the
newest complete checkpoint in `<run_dir>/checkpoints/`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dpldm.config import Config
from dpldm.distributed.engine import make_engine
from dpldm.distributed.env import DistEnv, barrier
from dpldm.log import log
from dpldm.rng import RunRandomness
from dpldm.run_dir import RunDir

# Exit code after a checkpoint written on SIGUSR1/SIGTERM: "preempted, re-run the same command to resume".
EXIT_PREEMPTED = 75
KEEP_CHECKPOINTS = 2


def public_seed(cfg: Config) -> int:
    """The seed of a run that sees public data only (pretraining): need not be secret, so reproducible (seed or 0)."""
    return 0 if cfg.seed is None else cfg.seed


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (step-N with its state.json, written last), or None."""
    done = sorted(p for p in Path(ckpt_dir).glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, module: nn.Module, trainable: dict[str, nn.Parameter],
                 total_steps: int, env: DistEnv):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = RunDir(self.run_dir).checkpoints
        self.module = module
        self.trainable = trainable
        self.total_steps = total_steps
        self.env = env
        self.engine = make_engine(module, trainable, cfg.optim, cfg.distributed, total_steps)
        self.step = 0
        self.samples_seen = 0
        self.seed = public_seed(cfg)   # the run seed; a private run's trainer sets its secret one
        self._stop_signal: int | None = None
        self._last_ckpt_time = time.time()

    # --- to override ------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def write_checkpoint_files(self, folder: Path) -> None:
        """Write state beyond the trainable weights, optimizer and JSON state (e.g. EMA weights) into the
        checkpoint's temporary `folder` (rank 0): it becomes visible with the rest, in one atomic rename."""

    def on_checkpoint(self, step: int) -> None:
        """After the checkpoint is in place (every rank): publish derived outputs (ledger, adapter, pipeline)."""

    def progress_fields(self) -> str:
        """Extra text for the progress line (e.g. epsilon spent)."""
        return ""

    # --- checkpoints ------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.ckpt_dir)

    def save_checkpoint(self) -> Path:
        """Write <run>/checkpoints/step-N whole: every file into a temporary folder, then one atomic rename
        (rank 0 writes, all ranks sync). A kill at any point leaves either the previous whole checkpoint or
        the new one (`latest_checkpoint` ignores folders without state.json and the .tmp- folder)."""
        path = self.ckpt_dir / f"step-{self.step:08d}"
        engine_state = self.engine.state_dict()  # collective under DeepSpeed: every rank calls it
        if self.env.is_main:
            tmp = self.ckpt_dir / f".tmp-step-{self.step:08d}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.engine.params().items()},
                      str(tmp / "trainable.safetensors"))
            torch.save(engine_state, tmp / "engine.pt")
            state = {"step": self.step, "samples_seen": self.samples_seen, "total_steps": self.total_steps,
                     "torch_rng": torch.get_rng_state().tolist(), "extra": self.extra_state(),
                     "time": time.time()}
            self.write_checkpoint_files(tmp)
            (tmp / "state.json").write_text(json.dumps(state))   # last: a folder without it is incomplete
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            for old in sorted(p for p in self.ckpt_dir.glob("step-*"))[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        self.on_checkpoint(self.step)
        barrier()
        self._last_ckpt_time = time.time()
        return path

    def load_checkpoint(self, path: Path) -> None:
        weights = load_file(str(path / "trainable.safetensors"))
        missing = set(self.trainable) - set(weights)
        if missing:
            from dpldm.errors import DpldmError
            raise DpldmError(f"checkpoint {path} lacks trainable parameters {sorted(missing)[:3]}...: "
                             "was it written with a different adapter config?")
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(weights[name].to(p.dtype))
        self.engine.load_state_dict(torch.load(path / "engine.pt", weights_only=False))
        state = json.loads((path / "state.json").read_text())
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        if self.env.rank:  # rank 0's saved state; other ranks must keep drawing different numbers
            torch.manual_seed(RunRandomness(self.seed).int_seed("torch", self.env.rank, self.step))
        self.load_extra_state(state["extra"])

    def _checkpoint_due(self) -> bool:
        every = self.cfg.train.checkpoint_every
        if every > 0:
            return self.step % every == 0
        return time.time() - self._last_ckpt_time > 300

    # --- the loop ---------------------------------------------------------------------------------
    def _agree(self, stop: bool, due: bool) -> tuple[bool, bool]:
        """All ranks act alike: stop/checkpoint if any rank wants to (signals and clocks differ per rank)."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return stop, due
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flags = torch.tensor([float(stop), float(due)], device=dev)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def fit(self) -> None:
        latest = self.latest_checkpoint()
        if latest is not None:
            self.load_checkpoint(latest)
            log(f"resumed from {latest} (step {self.step}/{self.total_steps})")
        previous = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        try:
            self._loop()
        finally:   # what follows the training (export, sampling, the next stage) gets the signals back
            for sig, handler in previous.items():
                if handler is not None:   # None: installed outside Python, nothing to put back
                    signal.signal(sig, handler)
        if self._stop_signal is not None:   # arrived after the last step's check: act on it now, as if unhandled
            signal.raise_signal(self._stop_signal)

    def _loop(self) -> None:
        t0, s0, step0 = time.time(), self.samples_seen, self.step
        loss_sum, loss_n = 0.0, 0
        while self.step < self.total_steps:
            metrics = self.train_step(self.step)
            self.step += 1
            self.samples_seen += int(metrics.get("samples", 0))
            if "loss" in metrics and math.isfinite(metrics["loss"]):
                loss_sum, loss_n = loss_sum + metrics["loss"], loss_n + 1
            if self.step % max(1, self.cfg.train.log_every) == 0 or self.step == self.total_steps:
                dt = max(time.time() - t0, 1e-9)
                rate = (self.samples_seen - s0) / dt
                eta = (self.total_steps - self.step) * dt / max(self.step - step0, 1)
                peak = ""
                if torch.cuda.is_available():
                    peak = f" | peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
                # a private fine-tune reports no loss (it is not DP) and counts expected, not drawn, samples
                loss_txt = f" | loss {loss_sum / loss_n:.4f}" if loss_n else ""
                log(f"step {self.step}/{self.total_steps} | {rate:.1f} samples/s{loss_txt}"
                    f"{self.progress_fields()}{peak} | ETA {_fmt_time(eta)}")
                loss_sum, loss_n = 0.0, 0
            stop, due = self._agree(self._stop_signal is not None,
                                    self.step < self.total_steps and self._checkpoint_due())
            if stop:
                self.save_checkpoint()
                log(f"signal {self._stop_signal}: checkpoint written at step {self.step}; re-run the same "
                    f"command to resume")
                sys.exit(EXIT_PREEMPTED)
            if due:
                self.save_checkpoint()
        if self.latest_checkpoint() is None or self.latest_checkpoint().name != f"step-{self.step:08d}":
            self.save_checkpoint()
