"""The strategy base: hooks that do nothing, so a method overrides only what it needs.

Inspired by Avalanche's plugins. Every hook gets ``ctx``, a `mllm_cl.context.StrategyContext`: the
model (``ctx.model``), its family and canonical parameter names, the recipe, the task tables
(``ctx.data``), evaluation (``ctx.evaluate()``) and records (``ctx.log``, ``ctx.log_metrics``,
``ctx.write_record``); never the LightningModule, so methods stay independent of its internals.
The LightningModule calls, in order:

- ``setup(ctx)`` once in ``configure_model``, after the model exists and before any sharding
  (freeze parameters, wrap modules, save what is needed);
- ``on_task_start(ctx, task)`` / ``on_task_end(ctx, task)`` around each task of the stream
  (``on_task_end`` runs before the post-task evaluation);
- ``before_evaluation(ctx, task)`` after every strategy's ``on_task_end``, right before the task's
  accuracy-matrix row is evaluated: the place to change the weights the row scores (WiSE-FT's merge)
  and to evaluate options first (``ctx.evaluate()``, WiSE-FT's α grid);
- ``train_data(ctx, task, table)`` when a task's train loader is built: return the samples to
  train on (default: `table` unchanged; data-hybrid and replay mix other samples in);
- ``loss(ctx, batch, outputs)`` every training step: an extra loss term added to the CE, or None
  (Lightning callbacks cannot change the loss, so terms go through ``training_step``);
- ``state_dict()`` / ``load_state_dict(state)``: saved in every checkpoint for an exact resume;
- ``cached_tables(data)``: never called in training; ``python -m mllm_cl cache`` builds the processed
  data of the tables a method will read (`data` is a `mllm_cl.context.TaskData`);
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

    def setup(self, ctx) -> None:
        """Called once after the model is built, before sharding."""

    def on_task_start(self, ctx, task: int) -> None:
        """Called before the first step of task `task` (0-based)."""

    def on_task_end(self, ctx, task: int) -> None:
        """Called after the last step of task `task`, before it is evaluated."""

    def before_evaluation(self, ctx, task: int) -> None:
        """Called after every strategy's `on_task_end(task)`, right before the row of task `task` is scored."""

    def train_data(self, ctx, task: int, table: Sequence[dict]) -> Sequence[dict]:
        """The samples task `task` trains on; `table` is the task's own data."""
        return table

    def loss(self, ctx, batch: dict, outputs) -> torch.Tensor | None:
        """Extra loss term for this training step, or None."""
        return None

    def state_dict(self) -> dict:
        """What must be checkpointed to resume exactly."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def cached_tables(self, data) -> list:
        """Tables this method reads beyond the stream's own, through ``data.cached`` (default: none)."""
        return []

    def memory(self, plan) -> list[MemoryTerm]:
        """Extra memory this method holds, for ``python -m mllm_cl plan`` (default: none).

        `plan` (`mllm_cl.plan_memory.PlanView`) gives the trainable parameter count, element sizes,
        sharding, batch shape and the model's Linear shapes; it is the only thing to read.
        """
        return []
