"""`model.eval_every_n_steps`: in-task learning curves beside the one-row-per-task accuracy matrix."""

from __future__ import annotations

import json

import lightning as L
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mllm_cl.data import EvalSet, Synthetic, Task, TaskStream
from mllm_cl.module import MLLMModule
from strategies.freeze import SAProj


def src(skill, seed, n=8):
    return Synthetic(skill, n=n, seed=seed, image_size=32)


def run(tmp_path, lr: float, every: int | None):
    L.seed_everything(0)
    module = MLLMModule(
        family="llava", recipe=SAProj(), lr=lr, warmup_ratio=0.0, max_new_tokens=3, eval_every_n_steps=every
    )
    stream = TaskStream(
        tasks=[
            Task("colour", train=src("colour", 1, 24), eval=src("colour", 2), steps=3),
            Task("shape", train=src("shape", 3, 24), eval=src("shape", 4), steps=3),
        ],
        heldout=[EvalSet("count", src("count", 5))],
        batch_size=4,
        eval_batch_size=8,
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
        logger=TensorBoardLogger(str(tmp_path), name="tb", version="v"),
    )  # fmt: skip
    trainer.fit(module, datamodule=stream)
    return module, tmp_path / "tb" / "v"


def test_curve_points_inside_tasks_rows_stay_one_per_task(tmp_path):
    # LR 0: the weights never move, so every curve point must equal the base row exactly.
    module, run_dir = run(tmp_path, lr=0.0, every=2)
    assert module.results.labels == ["base", "colour", "shape"]  # one row per task, as without curves
    lines = [json.loads(x) for x in (run_dir / "curve.jsonl").read_text().splitlines()]
    # 3 steps per task: global steps 2 and 4 are inside tasks; 6 is the last step (its row follows).
    assert [(r["step"], r["task"], r["task_name"]) for r in lines] == [(2, 0, "colour"), (4, 1, "shape")]
    base = dict(zip(module.results.columns, module.results.rows[0], strict=True))
    for record in lines:
        assert record["values"] == pytest.approx(base, abs=1e-9)
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("curve/count")] == [
        (2, pytest.approx(base["count"]))
    ] * 1 + [(4, pytest.approx(base["count"]))]
    assert [e.step for e in events.Scalars("curve/heldout_avg")] == [2, 4]


def test_no_curve_by_default_and_bad_value(tmp_path):
    _, run_dir = run(tmp_path, lr=1e-2, every=None)
    assert not (run_dir / "curve.jsonl").exists()
    with pytest.raises(ValueError, match="eval_every_n_steps"):
        MLLMModule(family="llava", eval_every_n_steps=0)
