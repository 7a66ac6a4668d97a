"""Checkpoints are whole: a kill between any two writes of a checkpoint leaves the previous whole checkpoint
(or the new whole one), never one that looks complete without all its files; resume then continues."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dpldm.config import Config, apply_mapping
from dpldm.distributed.env import DistEnv
from dpldm.train import trainer as T

FILES = {"trainable.safetensors", "engine.pt", "extra.safetensors", "state.json"}


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (BaseException, so no handler in the code catches it)."""


class TinyTrainer(T.Trainer):
    """A one-parameter regression trainer with an extra file per checkpoint (like pretraining's EMA)."""

    def __init__(self, run_dir: Path, steps: int):
        cfg = apply_mapping(Config(), {"train.checkpoint_every": 1, "train.log_every": 100, "optim.lr": 0.1})
        self.net = torch.nn.Linear(1, 1, bias=False)
        super().__init__(cfg, run_dir, self.net, dict(self.net.named_parameters()), steps, DistEnv())

    def train_step(self, step: int) -> dict:
        loss = (self.net(torch.ones(1, 1)) - 3.0).pow(2).sum()
        self.engine.set_grads(dict(zip(self.trainable, torch.autograd.grad(loss, list(self.trainable.values())))))
        self.engine.step()
        return {"samples": 1}

    def write_checkpoint_files(self, folder: Path) -> None:
        save_file({"w": self.net.weight.detach().clone()}, str(folder / "extra.safetensors"))


def _writes(monkeypatch, kill_at: int | None) -> list[str]:
    """Count (and optionally kill at) each write a checkpoint makes: files, then the rename."""
    seen: list[str] = []

    def gate(name):
        seen.append(name)
        if kill_at is not None and len(seen) == kill_at:
            raise Killed(name)
    for mod, attr in ((T, "save_file"), (T.torch, "save")):
        real = getattr(mod, attr)
        monkeypatch.setattr(mod, attr, lambda *a, _r=real, _n=attr, **k: (gate(_n), _r(*a, **k))[1])
    real_replace = T.os.replace
    monkeypatch.setattr(T.os, "replace", lambda *a: (gate("rename"), real_replace(*a))[1])
    real_extra = TinyTrainer.write_checkpoint_files
    monkeypatch.setattr(TinyTrainer, "write_checkpoint_files", lambda self, f: (gate("extra"), real_extra(self, f))[1])
    return seen


def test_a_kill_between_any_two_checkpoint_writes_leaves_a_whole_checkpoint(tmp_path, monkeypatch):
    with monkeypatch.context() as m:                   # how many writes does one checkpoint make?
        writes = _writes(m, None)
        TinyTrainer(tmp_path / "count", steps=1).fit()
    assert "rename" in writes and len(writes) >= 4
    for kill_at in range(1, len(writes) + 1):
        run = tmp_path / f"kill{kill_at}"
        TinyTrainer(run, steps=1).fit()                # a whole checkpoint at step 1
        with monkeypatch.context() as m:
            _writes(m, kill_at)
            with pytest.raises(Killed):
                TinyTrainer(run, steps=2).fit()        # killed while writing the step-2 checkpoint
        latest = TinyTrainer(run, steps=2).latest_checkpoint()
        step = json.loads((latest / "state.json").read_text())["step"]
        assert step in (1, 2) and {p.name for p in latest.iterdir()} == FILES, (kill_at, writes[kill_at - 1])
        w = load_file(str(latest / "trainable.safetensors"))["weight"]
        torch.testing.assert_close(load_file(str(latest / "extra.safetensors"))["w"], w)   # of one and the same step
        resumed = TinyTrainer(run, steps=3)
        resumed.fit()                                  # and the run goes on from it
        assert resumed.step == 3
