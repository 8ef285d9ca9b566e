"""Live forgetting monitor: the counting-bias probe (`mllm_cl.probe`) during and after every task.

Add it to a config with named probe sets, e.g. counting prompts (the target) and caption prompts
(held-out), probed side by side as Zhu et al. do:

    trainer:
      callbacks:
        - class_path: mllm_cl.monitor.CountingBiasProbe
          init_args:
            probe_sets:
              counting: {class_path: Synthetic, init_args: {skill: count, n: 32, seed: 9}}
              caption: {class_path: Synthetic, init_args: {skill: shape, n: 32, seed: 10}}
            log_spaced: true        # steps 1, 10, 100, 1000, ... of every task
            every_n_steps: 500      # and/or every N optimizer steps

TensorBoard scalars (x axis: optimizer step): `probe/<set>/number_mass`, `probe/<set>/max_number_prob`,
`probe/<set>/max_number_logit` (means over the set) and, with a `heldout_set`, `probe/heldout_acc`.
Every measurement is one line of `probe.jsonl` in the run directory: its label (``base``,
``after_<task>`` or ``step``), task, step, step within the task, per-set statistics with their std,
and the scalars above. `python -m mllm_cl report` correlates the probe's number mass with the
held-out change across the accuracy-matrix rows.
"""

from __future__ import annotations

import json
import os

import lightning as L

from mllm_cl.data.sources import Source
from mllm_cl.errors import ConfigError, DataError
from mllm_cl.evaluation import EvalColumn, evaluate_outside
from mllm_cl.probe import DEFAULT_MAX_NEW_TOKENS, probe
from mllm_cl.sharding import local_log_dir


def log_spaced(step: int) -> bool:
    """True for steps 1, 10, 100, 1000, ..."""
    while step >= 10 and step % 10 == 0:
        step //= 10
    return step == 1


class CountingBiasProbe(L.Callback):
    """Runs the counting-bias probe before training, after each task and on a step schedule.

    Args:
        probe_sets: named prompt sets probed side by side, e.g. {counting: ..., caption: ...}.
        probe_set: a single prompt set (older configs), probed under the name "default".
        every_n_steps: also probe every this many optimizer steps (None: only at task ends).
        log_spaced: also probe at steps 1, 10, 100, 1000, ... counted from each task's start.
        heldout_set: optional eval set whose greedy accuracy is logged as `probe/heldout_acc`.
        limit: use at most this many samples of each set (keeps the live monitor cheap).
        batch_size: prompts per generation batch.
        max_new_tokens: decoding steps per prompt (LMM_CL: 256).
        ordinals: count word ordinals (first, second, ...) as number tokens (not in LMM_CL's set).
        metric: answer metric of `heldout_set` (see `mllm_cl.metrics.build_metric`).
    """

    def __init__(
        self,
        probe_sets: dict[str, Source] | None = None,
        probe_set: Source | None = None,
        every_n_steps: int | None = None,
        log_spaced: bool = False,
        heldout_set: Source | None = None,
        limit: int = 64,
        batch_size: int = 16,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        ordinals: bool = False,
        metric: str = "exact_match",
    ):
        if every_n_steps is not None and every_n_steps < 1:
            raise ConfigError(
                f"CountingBiasProbe.every_n_steps={every_n_steps}; use a positive integer or null"
            )
        self.sets = dict(probe_sets or {})
        if probe_set is not None:
            if "default" in self.sets:
                raise ConfigError("CountingBiasProbe: give probe_sets or probe_set, not both with 'default'")
            self.sets["default"] = probe_set
        if not self.sets:
            raise ConfigError("CountingBiasProbe needs probe_sets (name -> source) or a probe_set")
        self.every_n_steps, self.log_spaced, self.heldout_set = every_n_steps, log_spaced, heldout_set
        self.limit, self.batch_size, self.max_new_tokens = limit, batch_size, max_new_tokens
        self.ordinals, self.metric = ordinals, metric
        self._last_step = -1
        self._task_starts: dict[str, int] = {}  # task -> its first global step (survives a resume)
        self.history: list[dict] = []

    def setup(self, trainer, pl_module, stage):
        self._probe = {name: self._head(src, f"probe_sets.{name}") for name, src in self.sets.items()}
        self._heldout = self._head(self.heldout_set, "heldout_set") if self.heldout_set else None

    def _head(self, source: Source, key: str) -> list[dict]:
        table = source.load()
        if len(table) == 0:
            raise DataError(f"CountingBiasProbe.{key}: {source.describe()} has no samples")
        return [table[i] for i in range(min(self.limit, len(table)))]

    # ---- when ---------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        if trainer.global_step == 0:
            self.measure(trainer, pl_module, "base")

    def on_train_epoch_start(self, trainer, pl_module):
        self._task_starts.setdefault(str(trainer.current_epoch), trainer.global_step)

    def _task_step(self, trainer) -> int:
        return trainer.global_step - self._task_starts.get(str(trainer.current_epoch), 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, in_task = trainer.global_step, self._task_step(trainer)
        due = (self.every_n_steps and step % self.every_n_steps == 0) or (
            self.log_spaced and log_spaced(in_task)
        )
        if due and step > 0 and step != self._last_step:
            self.measure(trainer, pl_module, "step")

    def on_train_epoch_end(self, trainer, pl_module):
        self.measure(trainer, pl_module, f"after_{trainer.datamodule.tasks[trainer.current_epoch].name}")

    # ---- what ---------------------------------------------------------------------------------
    def measure(self, trainer, pl_module, label: str) -> dict[str, float]:
        """Probe every set now; log the scalars at the current optimizer step and append to probe.jsonl."""
        self._last_step = trainer.global_step
        stats = {
            name: probe(pl_module, samples, self.batch_size, self.max_new_tokens, self.ordinals)
            for name, samples in self._probe.items()
        }
        scalars = {
            f"probe/{name}/{k}": v
            for name, s in stats.items()
            for k, v in s.items()
            if k != "n" and not k.endswith("_std")
        }
        if self._heldout is not None:
            scalars["probe/heldout_acc"] = self._accuracy(pl_module)
        record = {
            "label": label,
            "task": trainer.current_epoch,
            "step": trainer.global_step,
            "task_step": self._task_step(trainer),
            "sets": stats,
            **scalars,
        }
        self.history.append(record)
        if trainer.is_global_zero:
            if trainer.logger is not None:
                trainer.logger.log_metrics(scalars, step=trainer.global_step)
            log_dir = local_log_dir(trainer)  # trainer.log_dir broadcasts: would hang on rank 0 alone
            if log_dir:
                os.makedirs(log_dir, exist_ok=True)
                with open(os.path.join(log_dir, "probe.jsonl"), "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
        return scalars

    def _accuracy(self, pl_module) -> float:
        column = EvalColumn("heldout", self._heldout, self.metric, max_new_tokens=self.max_new_tokens)
        return evaluate_outside(pl_module, [column], self.batch_size)["heldout"].value

    def state_dict(self):
        return {"history": json.dumps(self.history), "task_starts": dict(self._task_starts)}

    def load_state_dict(self, state_dict):
        history = state_dict.get("history", "[]")
        self.history = json.loads(history) if isinstance(history, str) else list(history)
        self._task_starts = dict(state_dict.get("task_starts", {}))
