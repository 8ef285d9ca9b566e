"""Learning curves inside a task: every eval set scored every N optimizer steps (`model.eval_every_n_steps`).

The accuracy matrix keeps one row per task; these intermediate evaluations go elsewhere, so that one
long task (Li et al. train a single ImageNet task and watch the held-out sets fall and recover) still
gives a curve: TensorBoard ``curve/<set>`` and ``curve/heldout_avg`` with the optimizer step as x,
and one JSON line per evaluation in ``curve.jsonl`` in the run directory (task, task name, step,
{set: value}). A task's last step is skipped: its row is scored right after.
"""

from __future__ import annotations

import json
import os


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
        with open(os.path.join(module.run_dir, "curve.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**record, "values": values}) + "\n")
    return values
