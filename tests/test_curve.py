"""`model.eval_every_n_steps`: in-task learning curves beside the one-row-per-task accuracy matrix."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mllm_cl import faults
from mllm_cl.cli import main
from mllm_cl.data import EvalSet, Synthetic, Task, TaskStream
from mllm_cl.module import MLLMModule
from strategies.freeze import SAProj
from tests.helpers import cli_config


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


def curve_config(out: Path) -> Path:
    """One 6-step task, a curve point every 2 steps and a step checkpoint every 2 (never on the last)."""
    synthetic = {
        "class_path": "Synthetic",
        "init_args": {"skill": "colour", "n": 12, "seed": 3, "image_size": 32},
    }
    model = {"family": "llava", "recipe": {"class_path": "SAProj"}, "lr": 1e-2, "max_new_tokens": 2,
             "eval_every_n_steps": 2}  # fmt: skip
    data = {"batch_size": 2, "eval_batch_size": 4,
            "tasks": [{"name": "c", "train": synthetic, "eval": {**synthetic, "init_args": {
                **synthetic["init_args"], "n": 4, "seed": 4}}, "steps": 6}]}  # fmt: skip
    config = cli_config(out, "curve", model, data, version="v", deterministic=True)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump({**config, "checkpoint": {"every_n_train_steps": 2}}))
    return path


def curve_records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "curve" / "v" / "curve.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("point", ["curve", "curve_written"])
def test_a_run_stopped_at_a_curve_point_resumes_with_every_point_once(tmp_path, monkeypatch, point):
    """Stopped while scoring the step-4 point ("curve": before it is written; "curve_written": after),
    then resumed: the step-4 point is scored again from the step-2 checkpoint, and the file holds each
    point once, equal to an uninterrupted run's (the points used to be scored after the step's
    checkpoint, so a run stopped while scoring lost that point)."""
    main(["fit", "--config", str(curve_config(tmp_path / "straight"))])
    straight = curve_records(tmp_path / "straight")
    assert [r["step"] for r in straight] == [2, 4]  # 6 is the task's last step: its row follows

    config = curve_config(tmp_path / "cut")
    faults._seen.clear()
    monkeypatch.setenv("MLLM_CL_ENOSPC_AT", f"{point}:2")  # the 2nd visit: the step-4 point
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(config)])
    assert stopped.value.code == 2
    monkeypatch.delenv("MLLM_CL_ENOSPC_AT")
    main(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert curve_records(tmp_path / "cut") == straight
