"""DeepSpeed ZeRO (stage 1, 2 or 3) behind the engine interface of dpldm/distributed/engine.py.

Design: DeepSpeed manages only the *trainable* parameters. They are cloned into a small holder module
that is handed to `deepspeed.initialize` together with a torch optimizer; the caller's model stays a
plain nn.Module, replicated on every rank, so per-example gradients (torch.func vmap, opacus hooks) run
on it unchanged at every ZeRO stage — vmap over a ZeRO-3 engine module fails. ZeRO partitions the
optimizer state (1), the gradients (2) and the trainable parameters themselves (3) across ranks.

Gradients enter DeepSpeed through its public path: the holder's forward is the surrogate loss
sum_p <p, g_p>, whose gradient with respect to p is g_p exactly; `engine.backward` then reduces it.
DeepSpeed *averages* gradients over ranks, so
  - set_grads(g): every rank passes the same globally summed, noised, normalised g -> the average is g
    (no rescaling; tested);
  - backward(loss): each rank passes its local gradient -> the average is the data-parallel gradient.
After each step the full fp32 master values are copied back into the caller's model (`params()`).
"""
from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import torch
from torch import nn

from dpldm.config import DistributedConfig, OptimConfig
from dpldm.distributed.env import init_distributed
from dpldm.distributed.optim import make_optimizer, set_lr
from dpldm.errors import DpldmError


def load_deepspeed_config(path: str) -> dict:
    """Read a DeepSpeed JSON config; resolve `"bf16": {"enabled": "auto"}` (bf16 iff CUDA supports it)."""
    p = Path(path)
    if not p.is_file():
        raise DpldmError(f"distributed.deepspeed: {path} does not exist (expected a DeepSpeed JSON config)")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DpldmError(f"distributed.deepspeed: {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(cfg, dict):
        raise DpldmError(f"distributed.deepspeed: {path} must hold a JSON object")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise DpldmError(f"distributed.deepspeed: {path} zero_optimization.stage must be 1, 2 or 3; got "
                         f"{stage!r} (use distributed.deepspeed='' for plain torch)")
    for key in ("fp16",):
        if cfg.get(key, {}).get("enabled") in (True, "auto"):
            raise DpldmError(f"distributed.deepspeed: {path} {key} is not supported (loss scaling would rescale "
                             "the DP gradient); use bf16")
    bf16 = cfg.setdefault("bf16", {})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise DpldmError(f"distributed.deepspeed: {path} must not set '{key}'; the optimizer comes from "
                             "the optim.* config")
    cfg.pop("train_batch_size", None)       # batching is dpldm's (Poisson sampling), not DeepSpeed's
    cfg["train_micro_batch_size_per_gpu"] = 1
    cfg["gradient_accumulation_steps"] = 1
    cfg["zero_allow_untested_optimizer"] = True
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Holder(nn.Module):
    """The trainable parameters, cloned; forward(grads) = sum_p <p, g_p> (its gradient is g)."""

    def __init__(self, trainable: dict[str, nn.Parameter]):
        super().__init__()
        self.names = list(trainable)
        self.ps = nn.ParameterList([nn.Parameter(p.detach().clone()) for p in trainable.values()])

    def forward(self, grads: list[torch.Tensor]) -> torch.Tensor:
        total = None
        for p, g in zip(self.ps, grads):
            term = (p * g.to(device=p.device, dtype=p.dtype).reshape(p.shape)).sum().float()
            total = term if total is None else total + term
        return total


class DeepSpeedEngine:
    """ZeRO-partitioned optimizer for the trainable parameters; the caller's module stays plain."""

    def __init__(self, module: nn.Module, trainable: dict[str, nn.Parameter], optim_cfg: OptimConfig,
                 dist_cfg: DistributedConfig, total_steps: int = 0):
        import deepspeed   # here, not at module top: importing deepspeed costs seconds and JIT-compiles ops

        ds_config = load_deepspeed_config(dist_cfg.deepspeed)
        self.stage = ds_config["zero_optimization"]["stage"]
        self.module = module
        self.trainable = trainable
        env = init_distributed(dist_cfg.backend)
        if not all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT")) and env.world_size == 1:
            # one process without a launcher: DeepSpeed would otherwise try mpi4py discovery
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
        self.holder = _Holder(trainable)
        self.optim_cfg, self.total_steps = optim_cfg, total_steps
        self.steps = 0
        self._loaded = False
        optimizer = make_optimizer(list(self.holder.ps), optim_cfg)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if not torch.distributed.is_initialized():    # one process: DeepSpeed still wants a group
            backend = dist_cfg.backend if dist_cfg.backend != "auto" else \
                ("nccl" if torch.cuda.is_available() else "gloo")
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=self.holder, optimizer=optimizer, config=ds_config, dist_init_required=False)

    # -- interface ---------------------------------------------------------------------------
    def params(self) -> dict[str, torch.Tensor]:
        """The trainable parameters of the plain module (full fp32 values, synced after every step)."""
        return self.trainable

    def backward(self, loss: torch.Tensor) -> None:
        """Non-private step: local backward, then DeepSpeed averages the gradients over ranks."""
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable.values()]
        self._feed(grads)
        for p in self.trainable.values():
            p.grad = None

    def set_grads(self, grads: dict[str, torch.Tensor]) -> None:
        """DP step: `grads` is the same (globally summed, noised, normalised) gradient on every rank."""
        missing = [n for n in self.trainable if n not in grads]
        if missing:
            raise DpldmError(f"set_grads: no gradient for trainable parameter {missing[0]}")
        self._feed([grads[n].detach() for n in self.trainable])

    def step(self) -> None:
        set_lr(self.optimizer, self.optim_cfg, self.steps, self.total_steps)
        self.ds.step()
        self.steps += 1
        self._sync_module()

    def state_dict(self) -> dict:
        """Full (unpartitioned) fp32 params and optimizer state, the same on every rank, so a checkpoint
        resumes on any number of ranks. Collective: call on every rank (save it on rank 0)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        params, opt = {}, {}
        keys = self._state_keys()
        for name, p in zip(self.holder.names, self.holder.ps):
            params[name] = safe_get_full_fp32_param(p).detach().cpu().clone()
            opt[name] = {k: safe_get_full_optimizer_state(p, k).detach().cpu().clone() for k in keys}
        return {"params": params, "optimizer": opt, "optimizer_step": self._optimizer_step(),
                "steps": self.steps, "zero_stage": self.stage}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict written by any world size (collective: call on every rank)."""
        if state.get("optimizer") and not self._state_keys():
            self._materialise_optimizer_state()
        for name, p in zip(self.holder.names, self.holder.ps):
            if name not in state["params"]:
                raise DpldmError(f"engine checkpoint has no parameter {name} (different adapter config?)")
            self._set_full(p, state["params"][name])
            for k, v in state["optimizer"].get(name, {}).items():
                self._set_full(p, v, k)
        if state.get("optimizer_step") is not None:
            for st in self._torch_optimizer().state.values():
                if "step" in st:
                    st["step"] = torch.as_tensor(float(state["optimizer_step"])) \
                        if torch.is_tensor(st["step"]) else state["optimizer_step"]
        self.steps = int(state["steps"])
        self._loaded = True            # the fp32 master was set directly; the holder's copy is stale
        self._sync_module()

    # -- internals ---------------------------------------------------------------------------
    def _feed(self, grads: list[torch.Tensor]) -> None:
        loss = self.ds(grads)
        self.ds.backward(loss)

    def _set_full(self, p: nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
        """Set the fp32 master value (key=None) or an optimizer state tensor from its full value."""
        from deepspeed import comm
        from deepspeed.utils import (safe_get_local_fp32_param, safe_set_full_fp32_param,
                                     safe_set_full_optimizer_state, safe_set_local_fp32_param,
                                     safe_set_local_optimizer_state)
        value = value.to(torch.float32)
        if self.stage < 3:
            safe_set_full_fp32_param(p, value) if key is None else safe_set_full_optimizer_state(p, value, key)
            return
        # ZeRO-3's set_full_* mis-slices partitions padded to a multiple of the world size (0.19.8):
        # cut this rank's padded slice ourselves and use the local API.
        local = safe_get_local_fp32_param(p)
        size = local.numel()
        padded = torch.zeros(size * comm.get_world_size(), dtype=torch.float32)
        padded[:value.numel()] = value.flatten()
        mine = padded.narrow(0, size * comm.get_rank(), size).to(local.device).view_as(local)
        safe_set_local_fp32_param(p, mine) if key is None else safe_set_local_optimizer_state(p, mine, key)

    def _sync_module(self) -> None:
        from deepspeed.utils import safe_get_full_fp32_param
        with torch.no_grad():
            for p_hold, p in zip(self.holder.ps, self.trainable.values()):
                if self.stage < 3 and p_hold.dtype == torch.float32 and not self._loaded:
                    value = p_hold.data        # ZeRO 1/2 all-gathered the updated fp32 values already
                else:
                    value = safe_get_full_fp32_param(p_hold)
                p.copy_(value.reshape(p.shape).to(p.dtype))
        self._loaded = False

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        opt = self.optimizer
        while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
            opt = opt.optimizer
        return opt

    def _state_keys(self) -> list[str]:
        keys = set()
        for st in self._torch_optimizer().state.values():
            keys.update(k for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0)
        return sorted(keys)

    def _optimizer_step(self):
        for st in self._torch_optimizer().state.values():
            if "step" in st:
                return float(st["step"])
        return None

    def _materialise_optimizer_state(self) -> None:
        """Create the optimizer's state tensors with a zero-learning-rate step on zero gradients."""
        groups = self.optimizer.param_groups
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = 0.0
        self._feed([torch.zeros_like(p) for p in self.trainable.values()])
        self.ds.step()
        for g, lr in zip(groups, saved):
            g["lr"] = lr
