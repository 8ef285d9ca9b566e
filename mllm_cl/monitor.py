"""Live forgetting monitor: the counting-bias probe (`mllm_cl.probe`) during and after every task.

Add it to a config with

    trainer:
      callbacks:
        - class_path: mllm_cl.monitor.CountingBiasProbe
          init_args:
            probe_set: {class_path: Synthetic, init_args: {skill: shape, n: 32, seed: 9}}
            every_n_steps: 50

TensorBoard scalars (x axis: optimizer step): `probe/number_mass`, `probe/max_number_prob`,
`probe/max_number_logit` (means over the probe set) and, with a `heldout_set`, `probe/heldout_acc`.
Every measurement is also appended to `probe.jsonl` in the run directory with its task and step.
"""

from __future__ import annotations

import json
import os

import lightning as L

from mllm_cl.data.sources import Source
from mllm_cl.errors import ConfigError, DataError
from mllm_cl.evaluation import EvalColumn, evaluate, prompt_batches
from mllm_cl.probe import probe
from mllm_cl.sharding import local_log_dir


class CountingBiasProbe(L.Callback):
    """Runs the counting-bias probe before training, after each task and every N training steps.

    Args:
        probe_set: prompts to probe (e.g. caption / shape questions whose answers are not numbers).
        every_n_steps: also probe every this many optimizer steps (None: only at task ends).
        heldout_set: optional eval set whose greedy accuracy is logged as `probe/heldout_acc`.
        limit: use at most this many samples of each set (keeps the live monitor cheap).
        batch_size: prompts per generation batch.
        max_new_tokens: decoding steps per prompt.
        metric: answer metric of `heldout_set` (see `mllm_cl.metrics.build_metric`).
    """

    def __init__(
        self,
        probe_set: Source,
        every_n_steps: int | None = None,
        heldout_set: Source | None = None,
        limit: int = 64,
        batch_size: int = 16,
        max_new_tokens: int = 8,
        metric: str = "exact_match",
    ):
        if every_n_steps is not None and every_n_steps < 1:
            raise ConfigError(
                f"CountingBiasProbe.every_n_steps={every_n_steps}; use a positive integer or null"
            )
        self.probe_set, self.every_n_steps, self.heldout_set = probe_set, every_n_steps, heldout_set
        self.limit, self.batch_size, self.max_new_tokens, self.metric = (
            limit,
            batch_size,
            max_new_tokens,
            metric,
        )
        self._last_step = -1
        self.history: list[dict] = []

    def setup(self, trainer, pl_module, stage):
        self._probe = self._head(self.probe_set, "probe_set")
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

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.measure(trainer, pl_module, "step")

    def on_train_epoch_end(self, trainer, pl_module):
        self.measure(trainer, pl_module, f"after_{trainer.datamodule.tasks[trainer.current_epoch].name}")

    # ---- what ---------------------------------------------------------------------------------
    def measure(self, trainer, pl_module, label: str) -> dict[str, float]:
        """Probe now; log the scalars at the current optimizer step and append them to probe.jsonl."""
        self._last_step = trainer.global_step
        stats = probe(pl_module, self._probe, self.batch_size, self.max_new_tokens)
        scalars = {f"probe/{k}": v for k, v in stats.items() if k != "n" and not k.endswith("_std")}
        if self._heldout is not None:
            scalars["probe/heldout_acc"] = self._accuracy(pl_module)
        record = {
            "label": label,
            "task": trainer.current_epoch,
            "step": trainer.global_step,
            **stats,
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
        results = evaluate(
            pl_module, [column], lambda _: prompt_batches(pl_module, self._heldout, self.batch_size)
        )
        return results["heldout"].value

    def state_dict(self):
        return {"history": self.history}

    def load_state_dict(self, state_dict):
        self.history = list(state_dict.get("history", []))
