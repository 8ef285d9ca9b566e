"""Optimizer and the per-task learning-rate schedule.

Every task of the stream starts with a fresh optimizer state and its own warmup + cosine schedule
(LMM_CL: warmup ratio 0.03, cosine, weight decay 0), as if each stage were its own run, but within
one `fit` so the (possibly sharded) model is wrapped only once.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler


class TaskSchedule(LRScheduler):
    """Linear warmup then cosine decay to `min_lr_ratio`, restarted by `start_task`.

    Args:
        optimizer: the wrapped optimizer.
        warmup_ratio: fraction of the task's steps spent warming up.
        min_lr_ratio: final LR as a fraction of the peak.
        total_steps: steps of the first task (`start_task` sets it per task).
    """

    def __init__(
        self, optimizer, warmup_ratio: float = 0.03, min_lr_ratio: float = 0.0, total_steps: int = 1
    ):
        self.warmup_ratio, self.min_lr_ratio, self.total_steps = (
            warmup_ratio,
            min_lr_ratio,
            max(1, total_steps),
        )
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        warm = math.ceil(self.warmup_ratio * self.total_steps) if self.warmup_ratio > 0 else 0
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, self.total_steps - warm))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self):
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    def start_task(self, total_steps: int) -> None:
        """Restart the schedule for a task of `total_steps` optimizer steps."""
        self.total_steps = max(1, total_steps)
        self.last_epoch = 0
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Forget moments and step counts; AdamW re-creates them lazily on the next step."""
    optimizer.state.clear()


def param_groups(
    named_params, component_of, lr: float, component_lr: dict[str, float] | None, weight_decay: float
):
    """Trainable parameters grouped by component so each may have its own LR (e.g. vision 2e-6)."""
    component_lr = component_lr or {}
    groups: dict[float, list] = {}
    for name, param in named_params:
        if param.requires_grad:
            groups.setdefault(component_lr.get(component_of(name), lr), []).append(param)
    return [{"params": ps, "lr": group_lr, "weight_decay": weight_decay} for group_lr, ps in groups.items()]
