"""Exact resume after SIGKILL: a run killed inside task 2 and continued with ``--ckpt_path last``
ends with the same accuracy matrix and bit-identical weights as a run that was never stopped.

Both runs are real `python -m mllm_cl fit` subprocesses. The kill is deterministic: a callback
(`KillAt`, enabled only by an environment variable, so the resumed command is the same) sends
SIGKILL to its own process at the start of a step that follows a step-checkpoint, so the work done
since that checkpoint is lost and must be redone from the restored state.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.helpers import cli_config

ROOT = Path(__file__).resolve().parent.parent
STEPS = 20  # per task
KILL_STEP = 31  # task 2 spans global steps 20..39; the last checkpoint before it is at 30


class KillAt(L.Callback):
    """SIGKILL this process when $MLLM_CL_TEST_KILL_AT equals the global step about to run."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if os.environ.get("MLLM_CL_TEST_KILL_AT") == str(trainer.global_step):
            os.kill(os.getpid(), signal.SIGKILL)


def _synthetic(skill: str, n: int, seed: int) -> dict:
    return {
        "class_path": "Synthetic",
        "init_args": {"skill": skill, "n": n, "seed": seed, "image_size": 32, "object_size": [0.25, 0.45]},
    }


def stream_config(out: Path, recipe: str = "Full") -> dict:
    tasks = [
        {
            "name": name,
            "train": _synthetic(skill, 8, 10 + i),
            "eval": _synthetic(skill, 8, 10 + i),  # memorise: accuracies above 0
            "steps": STEPS,
        }
        for i, (name, skill) in enumerate([("t1", "colour"), ("t2", "shape"), ("t3", "spatial")])
    ]
    model = {"family": "llava", "recipe": {"class_path": recipe}, "lr": 3.0e-3, "warmup_ratio": 0.1,
             "max_new_tokens": 3}  # fmt: skip
    data = {"batch_size": 4, "eval_batch_size": 8, "tasks": tasks,
            "heldout": [{"name": "held", "data": _synthetic("colour", 8, 30)}]}  # fmt: skip
    callbacks = [{"class_path": "tests.test_resume.KillAt"}]
    config = cli_config(out / "runs", "resume", model, data, deterministic=True, callbacks=callbacks)
    return {**config, "checkpoint": {"every_n_train_steps": 3}}


def fit(config_path: Path, *extra: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("MLLM_CL_TEST_KILL_AT", None)
    if kill_at is not None:
        env["MLLM_CL_TEST_KILL_AT"] = str(kill_at)
    cmd = [sys.executable, "-m", "mllm_cl", "fit", "--config", str(config_path), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def run_dir(out: Path) -> Path:
    (version,) = (out / "runs" / "resume").glob("version_*")
    return version


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return checkpoint["state_dict"], checkpoint


def write_config(out: Path, recipe: str = "Full") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(stream_config(out, recipe)))
    return path


def run_killed_and_resumed(out: Path, recipe: str = "Full") -> Path:
    config = write_config(out, recipe)
    killed = fit(config, kill_at=KILL_STEP)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = run_dir(out)
    results = json.loads((run / "results.json").read_text())
    assert results["row_labels"] == ["base", "t1"]  # killed inside task 2
    _, checkpoint = final_weights(run)
    assert checkpoint["global_step"] == 30 and checkpoint["epoch"] == 1  # mid-task step checkpoint

    resumed = fit(config, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_dir(out) == run  # same run directory: no version_1
    return run


@pytest.mark.slow
def test_sigkill_mid_task_then_resume_equals_uninterrupted(tmp_path):
    straight = tmp_path / "straight"
    done = fit(write_config(straight))
    assert done.returncode == 0, done.stderr[-3000:]
    reference = run_dir(straight)

    resumed = run_killed_and_resumed(tmp_path / "killed")

    want = json.loads((reference / "results.json").read_text())
    got = json.loads((resumed / "results.json").read_text())
    assert got["row_labels"] == want["row_labels"] == ["base", "t1", "t2", "t3"]  # no row lost or doubled
    assert got["matrix"] == want["matrix"]  # exact
    assert any(v > 0 for row in want["matrix"] for v in row if v is not None)  # equality means something
    assert (resumed / "accuracy_matrix.csv").read_text() == (reference / "accuracy_matrix.csv").read_text()

    want_w, want_ckpt = final_weights(reference)
    got_w, got_ckpt = final_weights(resumed)
    assert got_ckpt["global_step"] == want_ckpt["global_step"] == 3 * STEPS
    assert want_w.keys() == got_w.keys() and len(want_w) > 0
    for key in want_w:
        assert torch.equal(got_w[key], want_w[key]), key  # tolerance 0
    # The optimizer moments after the resumed task are the same too.
    want_opt, got_opt = (c["optimizer_states"][0]["state"] for c in (want_ckpt, got_ckpt))
    assert want_opt.keys() == got_opt.keys()
    for k in want_opt:
        assert torch.equal(got_opt[k]["exp_avg"], want_opt[k]["exp_avg"])


@pytest.mark.slow
def test_saproj_checkpoint_holds_only_trainable_weights_and_resumes(tmp_path):
    run = run_killed_and_resumed(tmp_path / "saproj", recipe="SAProj")
    state, checkpoint = final_weights(run)
    module_names = checkpoint["mllm_cl_ckpt"]["trainable"]
    assert sorted(state) == sorted(module_names) and checkpoint["mllm_cl_ckpt"]["frozen_dropped"] > 0
    assert all(".self_attn." in k and "language_model" in k for k in state), sorted(state)[:5]
    results = json.loads((run / "results.json").read_text())
    assert results["row_labels"] == ["base", "t1", "t2", "t3"]


def test_results_are_written_atomically(tmp_path):
    """A write that fails half-way leaves the previous results file whole and no temp file behind."""
    from mllm_cl.results import atomic_write

    target = tmp_path / "results.json"
    atomic_write(str(target), '{"rows": 1}')

    with pytest.raises(TypeError):
        atomic_write(str(target), 12345)  # the temp file is opened, then writing fails
    assert target.read_text() == '{"rows": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


class SeeLast(L.Callback):
    """Records, at each task start, the task index stored in last.ckpt (None when there is none).

    Args:
        path: the last.ckpt to look at.
    """

    seen: list = []

    def __init__(self, path: str):
        self.path = path

    def on_train_epoch_start(self, trainer, pl_module):
        exists = os.path.exists(self.path)
        SeeLast.seen.append(torch.load(self.path, weights_only=True)["epoch"] if exists else None)


def test_default_fit_writes_last_ckpt_at_every_task_end(tmp_path):
    """Resuming at a task boundary needs last.ckpt after each task with the default checkpoint options."""
    from mllm_cl.cli import main
    from tests.helpers import write_config

    last = tmp_path / "run" / "v" / "checkpoints" / "last.ckpt"
    tasks = [{"name": f"t{i}", "train": _synthetic("colour", 8, i), "steps": 2} for i in range(3)]
    see = {"class_path": "tests.test_resume.SeeLast", "init_args": {"path": str(last)}}
    model = {"family": "llava", "recipe": {"class_path": "SAProj"}, "max_new_tokens": 1}
    SeeLast.seen = []
    main(["fit", "--config", str(write_config(tmp_path, "run", model, {"batch_size": 4, "tasks": tasks},
                                              callbacks=[see]))])  # fmt: skip
    assert SeeLast.seen == [None, 0, 1]  # written when tasks 0 and 1 ended
    assert torch.load(last, weights_only=True)["epoch"] == 2
