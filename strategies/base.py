"""The strategy base: hooks that do nothing, so a method overrides only what it needs.

Inspired by Avalanche's plugins. The LightningModule calls, in order:

- ``setup(module)`` once in ``configure_model``, after the model exists and before any sharding
  (freeze parameters, wrap modules, save what is needed);
- ``on_task_start(module, task)`` / ``on_task_end(module, task)`` around each task of the stream
  (``on_task_end`` runs before the post-task evaluation);
- ``before_evaluation(module, task)`` after every strategy's ``on_task_end``, right before the task's
  accuracy-matrix row is evaluated: the place to change the weights the row scores (WiSE-FT's merge)
  and to evaluate options first (``module.evaluate_all()``, WiSE-FT's α grid);
- ``train_data(module, task, table)`` when a task's train loader is built: return the samples to
  train on (default: `table` unchanged; data-hybrid and replay mix other samples in);
- ``loss(module, batch, outputs)`` every training step: an extra loss term added to the CE, or None
  (Lightning callbacks cannot change the loss, so terms go through ``training_step``);
- ``state_dict()`` / ``load_state_dict(state)``: saved in every checkpoint for an exact resume;
- ``memory(plan)``: never called in training; ``python -m mllm_cl plan`` asks each method for the
  memory it holds beyond the model, gradients and optimizer (see `MemoryTerm`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


def trainable_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters (under FSDP2 each copy stays a local DTensor shard)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class MemoryTerm(NamedTuple):
    """One block of memory a method holds, as `memory(plan)` declares it to ``mllm_cl plan``.

    ``nbytes`` is per GPU (``where="gpu"``) or per training process in host RAM (``where="host"``).
    ``replaces`` names a base term this one stands in for: LoRA trains its adapters instead of the
    recipe's weights, so its adapter gradients replace the plan's "gradients".
    """

    name: str
    nbytes: int
    note: str = ""
    where: str = "gpu"
    replaces: str | None = None


class Strategy:
    """A continual-learning method. Subclass it and override the hooks you need."""

    # True when the trainable tensors are not the model's weights but a reparametrisation of them (LoRA's
    # A and B): weight-space methods (WiSE-FT) must not interpolate them.
    reparametrizes_weights: bool = False

    def setup(self, module) -> None:
        """Called once after the model is built, before sharding."""

    def on_task_start(self, module, task: int) -> None:
        """Called before the first step of task `task` (0-based)."""

    def on_task_end(self, module, task: int) -> None:
        """Called after the last step of task `task`, before it is evaluated."""

    def before_evaluation(self, module, task: int) -> None:
        """Called after every strategy's `on_task_end(task)`, right before the row of task `task` is scored."""

    def train_data(self, module, task: int, table: Sequence[dict]) -> Sequence[dict]:
        """The samples task `task` trains on; `table` is the task's own data."""
        return table

    def loss(self, module, batch: dict, outputs) -> torch.Tensor | None:
        """Extra loss term for this training step, or None."""
        return None

    def state_dict(self) -> dict:
        """What must be checkpointed to resume exactly."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def memory(self, plan) -> list[MemoryTerm]:
        """Extra memory this method holds, for ``python -m mllm_cl plan`` (default: none).

        `plan` (`mllm_cl.plan_memory.PlanView`) gives the trainable parameter count, element sizes,
        sharding, batch shape and the model's Linear shapes; it is the only thing to read.
        """
        return []
