"""Per-step learning-rate schedules: linear warmup, then cosine, multistep or constant."""

from __future__ import annotations

import bisect
import math

import torch


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int, milestones: tuple[float, ...],
              gamma: float):
    """Return step -> LR multiplier; milestones are fractions of training."""
    marks = sorted(int(m * total_steps) for m in milestones)

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if schedule == "multistep":
            return gamma ** bisect.bisect_right(marks, step)
        return 1.0

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int,
                    milestones: tuple[float, ...], gamma: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, total_steps, warmup_steps, milestones, gamma))
