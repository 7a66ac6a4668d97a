"""Tail (Polyak–Ruppert) averaging of DP-fine-tuned adapter weights: post-processing, no privacy cost.

A DP fine-tune's last iterate carries the noise of its last few steps; the uniform average of the iterates over
the last `fraction` of the run keeps their common progress and averages their noise (for steps whose noise is
independent, the noise in the average falls ~ 1/sqrt(steps averaged)). Every iterate is already a DP release
of the run (the accountant counts all steps), so their average costs nothing more.

    avg = TailAverage(trainable, total_steps=80, fraction=0.5)   # averages steps 41..80
    ...; engine.step(); avg.update(step_done, trainable)          # after each optimizer step (1-based count)
    avg.copy_to(trainable)                                        # before saving the adapters

`state_dict()` / `load_state_dict()` carry the running sum across a resume.
"""
from __future__ import annotations

import torch

from dpldm.errors import DpldmError


class TailAverage:
    """Uniform average of a dict of parameters over optimizer steps start+1..total_steps."""

    def __init__(self, params: dict[str, torch.Tensor], total_steps: int, fraction: float = 0.5):
        if total_steps < 1:
            raise DpldmError(f"tail average: total_steps must be >= 1; got {total_steps}")
        if not 0.0 < fraction <= 1.0:
            raise DpldmError(f"tail average: fraction must be in (0, 1]; got {fraction}")
        self.total_steps = total_steps
        self.start = total_steps - max(1, round(fraction * total_steps))   # steps after this one are averaged
        self.count = 0
        self.sum = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}

    @torch.no_grad()
    def update(self, step: int, params: dict[str, torch.Tensor]) -> None:
        """Record the parameters after optimizer step `step` (1-based: the number of steps taken)."""
        if step <= self.start or step > self.total_steps:
            return
        for n, p in params.items():
            self.sum[n] += p.detach().to(torch.float64)
        self.count += 1

    @torch.no_grad()
    def copy_to(self, params: dict[str, torch.Tensor]) -> bool:
        """Write the average into `params` (in place); False (params unchanged) if no step was averaged yet."""
        if self.count == 0:
            return False
        missing = [n for n in params if n not in self.sum]
        if missing:
            raise DpldmError(f"tail average: no running sum for parameter {missing[0]!r}")
        for n, p in params.items():
            p.copy_((self.sum[n] / self.count).to(device=p.device, dtype=p.dtype))
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"sum.{n}": t.cpu() for n, t in self.sum.items()},
                "count": torch.tensor(self.count), "start": torch.tensor(self.start),
                "total_steps": torch.tensor(self.total_steps)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if int(state["start"]) != self.start or int(state["total_steps"]) != self.total_steps:
            raise DpldmError(f"tail average: checkpoint averages steps {int(state['start']) + 1}.."
                             f"{int(state['total_steps'])}, this run {self.start + 1}..{self.total_steps}")
        for n in self.sum:
            if f"sum.{n}" not in state:
                raise DpldmError(f"tail average: checkpoint lacks the running sum of {n!r}")
            self.sum[n].copy_(state[f"sum.{n}"])
        self.count = int(state["count"])
