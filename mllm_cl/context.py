"""What a strategy sees of the run: the narrow context its hooks receive instead of the LightningModule.

A continual-learning method needs the model, its family's canonical parameter names, the task
tables, evaluation, and a place to log and write its records. `StrategyContext` gives exactly that,
so a strategy never reaches into ``trainer.datamodule``, the module's private caches or Lightning's
logger plumbing, and a refactor of the module cannot break a user's method. `TaskData` is the data
part alone: the ``cache`` command hands it to `Strategy.cached_tables` with no module built around it.

Both are thin views (nothing copied, nothing cached but the validation columns), built once per
module by ``MLLMModule.context``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from mllm_cl.evaluation import ColumnResult, evaluate_outside, outside_columns
from mllm_cl.results import atomic_write


class TaskData:
    """The stream's tasks as a strategy sees them (a view of `mllm_cl.data.TaskStream`)."""

    def __init__(self, stream):
        self._stream = stream

    @property
    def tasks(self) -> list[str]:
        """Task names, in training order."""
        return [t.name for t in self._stream.tasks]

    @property
    def eval_names(self) -> list[str]:
        """Every eval set the accuracy matrix reports: the tasks' eval sets, then held-out."""
        return list(self._stream.eval_names)

    @property
    def heldout_names(self) -> list[str]:
        return [h.name for h in self._stream.heldout]

    def train_table(self, task: int) -> Sequence[dict]:
        """Task `task`'s own training samples (loaded and cached by the stream)."""
        return self._stream.train_table(task)

    def task_samples(self, task: int) -> int:
        """Samples task `task` consumes over all ranks: optimizer steps × accumulation × batch × world
        (the stream's trainer when attached, else one process without accumulation)."""
        return self._stream.samples_for(task)

    def cached(self, table: Sequence[dict], name: str) -> Sequence[dict]:
        """`table` through the stream's processed-data cache (tokenised once, reused by later runs);
        `name` describes it in messages."""
        return self._stream.tokenized(table, name)


class StrategyContext:
    """The run as a strategy's hooks see it (see `strategies.base.Strategy`).

    Attributes:
        model: the Hugging Face model being trained (after `setup`, possibly sharded).
        family: its `mllm_cl.families.Family` (component roots, chat template, name).
        recipe: the freezing recipe (its ``patterns`` select the trained weights).
    """

    def __init__(self, module):
        self._module = module
        self._validation: dict[tuple[int, ...], list] = {}

    # ---- the model -----------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self._module.model

    @property
    def family(self):
        return self._module.family

    @property
    def recipe(self):
        return self._module.recipe

    @property
    def strategies(self) -> list:
        """The methods applied after the recipe, in order (to refuse incompatible combinations)."""
        return list(self._module.strategies)

    def canonical_names(self) -> dict[str, str]:
        """Real parameter name -> canonical ``component.name`` (family-independent, see families)."""
        return self._module.canonical_names()

    def parameters_changed(self) -> None:
        """Call after adding or renaming parameters (LoRA's adapters): canonical names are recomputed."""
        self._module.forget_canonical_names()

    # ---- the stream ----------------------------------------------------------------------------
    @property
    def task(self) -> int:
        """Index of the task being trained (0-based; -1 before the first)."""
        trainer = self._module._trainer
        return trainer.current_epoch if trainer is not None else -1

    @property
    def data(self) -> TaskData:
        return TaskData(self._module.trainer.datamodule)

    def evaluate(self, eval_sets: Sequence | None = None) -> dict[str, ColumnResult]:
        """Score the model now: every eval set of the accuracy matrix, or `eval_sets` (`EvalSet`s
        outside it, e.g. WiSE-FT's validation sets; loaded once). Every rank must call it."""
        if eval_sets is None:
            return self._module.evaluate_all()
        key = tuple(id(s) for s in eval_sets)
        stream = self._module.trainer.datamodule
        if key not in self._validation:
            self._validation[key] = outside_columns(eval_sets, stream.eval_limit)
        return evaluate_outside(self._module, self._validation[key], stream.eval_batch_size)

    # ---- records -------------------------------------------------------------------------------
    def log(self, name: str, value: float) -> None:
        """A scalar of the current training step (inside `loss`), e.g. ``train/lwf_empty_batches``."""
        self._module.log(name, value)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at an x of the strategy's choosing (e.g. the task index), to every logger."""
        for logger in self._module.loggers:
            logger.log_metrics(metrics, step=step)

    @property
    def is_global_zero(self) -> bool:
        return self._module.global_rank_zero()

    def write_record(self, filename: str, text: str) -> str | None:
        """Write `text` to `filename` in the run directory (rank 0, atomically); its path, or None
        when the run has no directory (no logger) or this is not rank 0."""
        run_dir = self._module.run_dir
        if not (self.is_global_zero and run_dir):
            return None
        path = os.path.join(run_dir, filename)
        atomic_write(path, text)
        return path
