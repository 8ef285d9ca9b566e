"""Learning curves inside a task: every eval set scored every N optimizer steps (`model.eval_every_n_steps`).

The accuracy matrix keeps one row per task; these intermediate evaluations go elsewhere, so that one
long task (Li et al. train a single ImageNet task and watch the held-out sets fall and recover) still
gives a curve: TensorBoard ``curve/<set>`` and ``curve/heldout_avg`` with the optimizer step as x,
and one JSON line per evaluation in ``curve.jsonl`` in the run directory (task, task name, step,
{set: value}). A task's last step is skipped: its row is scored right after.

Resume: the points are scored by a callback (`CurvePoints`), whose ``on_train_batch_end`` runs
before the checkpoint callbacks' (Lightning orders those last), so a step checkpoint is written after
its step's point. A run killed while scoring a point resumes from the checkpoint before it, redoes
the steps and scores the point again; records past the restored step are dropped from curve.jsonl
first (their steps are redone), so every point is there once. TensorBoard keeps both copies of a
redone point's scalars (same values: the steps are redone exactly).
"""

from __future__ import annotations

import json
import os

from lightning.pytorch.callbacks import Callback

from mllm_cl import faults
from mllm_cl.results import atomic_write

FILE = "curve.jsonl"


class CurvePoints(Callback):
    """Scores every eval set every `every` optimizer steps (added by ``MLLMModule.configure_callbacks``)."""

    def __init__(self, every: int):
        self.every = every

    def on_train_start(self, trainer, pl_module) -> None:
        trim(pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if due(pl_module, self.every, batch_idx):
            evaluate_step(pl_module)


def due(module, every: int | None, batch_idx: int) -> bool:
    """Whether the step just taken is an evaluation point (not the task's last batch, whose row follows)."""
    trainer = module.trainer
    step = trainer.global_step
    last_batch = batch_idx + 1 >= trainer.num_training_batches
    return bool(every) and step > 0 and step % every == 0 and not last_batch and module._curve_step != step


def evaluate_step(module) -> dict[str, float]:
    """Score every eval set of the stream now; log and record it (see the module docstring)."""
    trainer = module.trainer
    module._curve_step = trainer.global_step
    faults.point("curve")  # a kill while scoring (before the step's checkpoint)
    values = {name: r.value for name, r in module.evaluate_all().items()}
    heldout = [values[h.name] for h in module.stream.heldout if h.name in values]
    task = trainer.current_epoch
    if module.logger is not None:
        scalars = {f"curve/{k}": v for k, v in values.items()}
        if heldout:
            scalars["curve/heldout_avg"] = sum(heldout) / len(heldout)
        module.logger.log_metrics(scalars, step=trainer.global_step)
    if module.global_rank_zero() and module.run_dir:
        record = {"task": task, "task_name": module.stream.tasks[task].name, "step": trainer.global_step}
        os.makedirs(module.run_dir, exist_ok=True)
        with open(os.path.join(module.run_dir, FILE), "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**record, "values": values}) + "\n")
    faults.point("curve_written")
    return values


def trim(module, step: int) -> None:
    """Drop the records of steps after `step` (a resumed run redoes those steps and their points)."""
    path = os.path.join(module.run_dir, FILE) if module.global_rank_zero() and module.run_dir else None
    if not path or not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        atomic_write(path, "".join(kept))
