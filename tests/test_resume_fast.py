"""The exact-resume guard of the default test selection (the SIGKILL version is tests/test_resume.py,
marked slow): a run that crashes inside task 2 and is continued with ``--ckpt_path last`` ends with
the same accuracy matrix, weights and optimizer moments as a run that never stopped.

Black box, through the CLI in this process: the crash is an exception raised by a callback at the
start of a step that follows a step checkpoint, so the work done since that checkpoint is lost and
must be redone from the restored state, from the right sample of the task (the mid-task offset).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from mllm_cl.cli import main
from tests.helpers import cli_config

STEPS = 4  # per task: task 2 spans global steps 4..7
CRASH_STEP = 7  # checkpoints every 2 steps: the newest before the crash is at step 6, inside task 2


class Crash(RuntimeError):
    """The simulated failure."""


class CrashAt(L.Callback):
    """Raises `Crash` when $MLLM_CL_TEST_CRASH_AT equals the global step about to run."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if os.environ.get("MLLM_CL_TEST_CRASH_AT") == str(trainer.global_step):
            raise Crash(f"crash at step {trainer.global_step}")


def _synthetic(skill: str, n: int, seed: int) -> dict:
    args = {"skill": skill, "n": n, "seed": seed, "image_size": 32, "object_size": [0.5, 0.9]}
    return {"class_path": "Synthetic", "init_args": args}


def write_config(out: Path) -> Path:
    tasks = [
        {"name": name, "train": _synthetic(skill, 8, 10 + i), "eval": _synthetic(skill, 4, 10 + i), "steps": STEPS}
        for i, (name, skill) in enumerate([("t1", "colour"), ("t2", "shape")])
    ]  # fmt: skip
    model = {"family": "llava", "recipe": {"class_path": "SAProj"}, "lr": 1e-2, "warmup_ratio": 0.25,
             "max_new_tokens": 2}  # fmt: skip
    data = {"batch_size": 2, "eval_batch_size": 4, "tasks": tasks}
    callbacks = [{"class_path": "tests.test_resume_fast.CrashAt"}]
    config = cli_config(
        out / "runs", "resume", model, data, version="v", deterministic=True, callbacks=callbacks
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump({**config, "checkpoint": {"every_n_train_steps": 2}}))
    return path


def last_checkpoint(out: Path) -> dict:
    return torch.load(out / "runs" / "resume" / "v" / "checkpoints" / "last.ckpt", weights_only=True)


def results(out: Path) -> dict:
    return json.loads((out / "runs" / "resume" / "v" / "results.json").read_text())


def predictions(out: Path) -> dict[str, str]:
    """Every saved answer file of the run, by path below predictions/ (the model's generated text:
    equal files mean equal answers, even where every accuracy is 0)."""
    root = out / "runs" / "resume" / "v" / "predictions"
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.jsonl"))}


def test_crash_mid_task_then_resume_equals_uninterrupted(tmp_path, monkeypatch, capsys):
    straight = tmp_path / "straight"
    main(["fit", "--config", str(write_config(straight))])

    cut = tmp_path / "cut"
    config = write_config(cut)
    monkeypatch.setenv("MLLM_CL_TEST_CRASH_AT", str(CRASH_STEP))
    with pytest.raises(Crash):
        main(["fit", "--config", str(config)])
    assert results(cut)["row_labels"] == ["base", "t1"]  # stopped inside task 2
    stopped = last_checkpoint(cut)
    assert stopped["global_step"] == 6 and stopped["epoch"] == 1  # resumes 2 batches into task 2
    monkeypatch.delenv("MLLM_CL_TEST_CRASH_AT")
    capsys.readouterr()
    main(["fit", "--config", str(config), "--ckpt_path", "last"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[mllm_cl] after ")]
    assert [r.split(":")[0] for r in rows] == ["[mllm_cl] after t2"]  # base and t1 are not scored again

    want, got = results(straight), results(cut)
    assert got["row_labels"] == want["row_labels"] == ["base", "t1", "t2"]  # no row lost or doubled
    assert got["matrix"] == want["matrix"]  # exact
    assert predictions(cut) == predictions(straight) and len(predictions(straight)) == 3 * 2  # rows × sets
    want_ckpt, got_ckpt = last_checkpoint(straight), last_checkpoint(cut)
    assert got_ckpt["global_step"] == want_ckpt["global_step"] == 2 * STEPS
    want_w, got_w = want_ckpt["state_dict"], got_ckpt["state_dict"]
    assert want_w.keys() == got_w.keys() and len(want_w) > 0
    for key in want_w:
        assert torch.equal(got_w[key], want_w[key]), key  # tolerance 0
    assert any(not torch.equal(stopped["state_dict"][k], want_w[k]) for k in want_w)  # steps 6, 7 trained
    want_opt, got_opt = (c["optimizer_states"][0]["state"] for c in (want_ckpt, got_ckpt))
    assert want_opt.keys() == got_opt.keys() and len(want_opt) > 0
    for k in want_opt:
        assert torch.equal(got_opt[k]["exp_avg"], want_opt[k]["exp_avg"])
        assert torch.equal(got_opt[k]["exp_avg_sq"], want_opt[k]["exp_avg_sq"])
        assert float(got_opt[k]["step"]) == float(want_opt[k]["step"]) == STEPS  # reset at task 2's start
