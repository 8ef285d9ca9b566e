"""Kill a run at every point of a task's life, resume it with ``--ckpt_path last``, and compare with
a run that was never stopped: the same results files byte for byte and the same checkpoint tensors
(weights, merged LoRA bases, WiSE-FT start weights, optimizer moments) with tolerance 0.

Every run is a real ``python -m mllm_cl fit`` subprocess. The kill is deterministic:
``MLLM_CL_KILL_AT=<point>[:<n>]`` makes the process SIGKILL itself the n-th time it reaches a named
point (`mllm_cl.faults`), so the resumed command is the same command. Each task is 20 steps with a
step checkpoint every 5, so a step checkpoint would fall on each task's last step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import cli_config

ROOT = Path(__file__).resolve().parent.parent
STEPS = 20


def _synthetic(skill: str, seed: int) -> dict:
    args = {"skill": skill, "n": 8, "seed": seed, "image_size": 32, "object_size": [0.25, 0.45]}
    return {"class_path": "Synthetic", "init_args": args}


def write_config(out: Path, kind: str) -> Path:
    """Two tasks plus a held-out set; "wiseft": Full + WiSE-FT α 0.9, "lora": SAProj + LoRA."""
    tasks = [
        {"name": f"t{i}", "train": _synthetic(skill, i), "eval": _synthetic(skill, i), "steps": STEPS}
        for i, skill in enumerate(["colour", "shape"])
    ]
    data = {"batch_size": 4, "eval_batch_size": 8, "tasks": tasks,
            "heldout": [{"name": "held", "data": _synthetic("colour", 30)}]}  # fmt: skip
    model = {"family": "llava", "recipe": {"class_path": "Full"}, "lr": 3e-3, "warmup_ratio": 0.1,
             "max_new_tokens": 3}  # fmt: skip
    callbacks = [{"class_path": "WiSEFT", "init_args": {"alpha": 0.9}}]
    if kind == "lora":
        model.update(recipe={"class_path": "SAProj"}, lr=0.01)
        model["strategies"] = [{"class_path": "LoRA", "init_args": {"r": 4, "alpha": 8}}]
        callbacks = []
    config = cli_config(out / "runs", "k", model, data, deterministic=True, callbacks=callbacks)
    config["checkpoint"] = {"every_n_train_steps": 5}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(command: str, config: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    for var in ("MLLM_CL_KILL_AT", "MLLM_CL_ENOSPC_AT", "MLLM_CL_PAUSE_AT"):
        if var not in env or not env[var]:
            env.pop(var, None)
    cmd = [sys.executable, "-m", "mllm_cl", command, "--config", str(config), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def the_run(out: Path) -> Path:
    (run,) = (out / "runs" / "k").glob("version_*")  # exactly one: a resume opens no new version
    return run


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint by its path (weights, strategy and callback state, optimizer)."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else []
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}/{key}").items()}


def load_last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def assert_same_run(got: Path, want: Path) -> None:
    for name in ("results.json", "accuracy_matrix.csv"):
        assert (got / name).read_bytes() == (want / name).read_bytes(), name
    got_ckpt, want_ckpt = load_last(got), load_last(want)
    assert got_ckpt["global_step"] == want_ckpt["global_step"] == 2 * STEPS
    # ModelCheckpoint's own bookkeeping (kth_value) is keyed by its options, which may differ.
    got_t, want_t = ({k: v for k, v in tensors(c).items() if "/callbacks/TaskCheckpoint" not in k}
                     for c in (got_ckpt, want_ckpt))  # fmt: skip
    assert got_t.keys() == want_t.keys() and any("state_dict" in k for k in want_t)
    for key in want_t:
        assert torch.equal(got_t[key], want_t[key]), key  # tolerance 0


def reference(tmp_path_factory, kind: str) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp(f"reference_{kind}")
    done = cli("fit", write_config(out, kind))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((the_run(out) / "results.json").read_text())
    assert results["row_labels"] == ["base", "t0", "t1"]
    return the_run(out), results


@pytest.fixture(scope="module")
def reference_wiseft(tmp_path_factory):
    run, results = reference(tmp_path_factory, "wiseft")
    assert any(v for row in results["matrix"] for v in row), results  # equality then means something
    return run


@pytest.fixture(scope="module")
def reference_lora(tmp_path_factory):
    return reference(tmp_path_factory, "lora")[0]


def kill_and_resume(out: Path, kind: str, point: str, *extra: str) -> tuple[Path, str, dict]:
    """Run until `point` kills it, then resume; the run dir, the resume's stdout, the killed last.ckpt."""
    config = write_config(out, kind)
    killed = cli("fit", config, *extra, MLLM_CL_KILL_AT=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = the_run(out)
    at_kill = load_last(run) if (run / "checkpoints" / "last.ckpt").exists() else {}
    resumed = cli("fit", config, *extra, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = [line for line in resumed.stdout.splitlines() if "--ckpt_path last:" in line]
    assert len(said) == 1 and str(run) in said[0], resumed.stdout[-2000:]  # which run, in one line
    return the_run(out), resumed.stdout, at_kill


def test_kill_during_the_post_task_evaluation_loses_no_task(reference_wiseft, tmp_path):
    """Issue 13 (C): killed between task 0's last step and its task-end checkpoint (while its row is
    evaluated). Before the fix the resume skipped task 0's end and never trained task 1."""
    run, out, at_kill = kill_and_resume(tmp_path, "wiseft", "evaluated:2")  # row 1 = task 0's
    assert at_kill["global_step"] == STEPS and at_kill["mllm_cl"]["results"]["row_labels"] == ["base"]
    assert "task 0 (t0) was trained but its end was interrupted" in out
    assert_same_run(run, reference_wiseft)


def test_last_ckpt_is_the_evaluated_model(reference_wiseft):
    """Issue 13 (B): a step checkpoint on a task's last step no longer stands in for the task-end
    one, so ``validate`` of last.ckpt reproduces the matrix's last row, answer for answer, and
    writes into that run's directory."""
    config = reference_wiseft.parent.parent.parent / "config.yaml"
    done = cli("validate", config, "--ckpt_path", str(reference_wiseft / "checkpoints" / "last.ckpt"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in reference_wiseft.parent.iterdir()] == [reference_wiseft.name]  # no new version
    record = json.loads((reference_wiseft / "eval_validate.json").read_text())
    results = json.loads((reference_wiseft / "results.json").read_text())
    assert record["accuracy"] == dict(zip(results["columns"], results["matrix"][-1], strict=True))
    for name in results["columns"]:
        fit_rows = (reference_wiseft / "predictions" / "2_t1" / f"{name}.jsonl").read_text().splitlines()
        val_rows = (reference_wiseft / "predictions" / "validate" / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(r)["prediction"] for r in val_rows] == [
            json.loads(r)["prediction"] for r in fit_rows
        ]


# (point, extra CLI args): every place a kill leaves a different state behind.
WISEFT_POINTS = [
    ("step:8", ()),  # mid-task, after the step-5 checkpoint
    ("last_step:1", ()),  # task 0's last step, a step checkpoint due there (every 5)
    ("last_step:1", ("--checkpoint.every_n_train_steps", "3")),  # ... and none due there
    ("task_trained:1", ()),  # task 0's "trained" checkpoint written, nothing of its end done
    ("task_end:1", ()),  # WiSE-FT merged in memory, not evaluated
    ("write.results.json:2", ()),  # task 0's row being written
    ("write.accuracy_matrix.csv:2", ()),
    ("write.last.ckpt:4", ()),  # the "trained" checkpoint of task 0 being written (saves: 5, 10, 15, 20)
    ("write.last.ckpt:5", ()),  # the task-end checkpoint of task 0 being written
    ("task_done:1", ()),  # right after task 0's task-end checkpoint
    ("task_trained:2", ()),  # the last task: its end redone although Lightning thinks the fit is over
    ("evaluated:3", ()),
    ("task_done:2", ()),
]


@pytest.mark.slow
@pytest.mark.parametrize(("point", "extra"), WISEFT_POINTS, ids=[" ".join((p, *e)) for p, e in WISEFT_POINTS])
def test_kill_anywhere_then_resume_equals_uninterrupted(reference_wiseft, tmp_path, point, extra):
    run, _, _ = kill_and_resume(tmp_path, "wiseft", point, *extra)
    assert_same_run(run, reference_wiseft)
    assert not list(run.rglob(".tmp-*")) and not list(run.rglob(".*.tmp-*"))  # no partial writes left


@pytest.mark.slow
def test_last_ckpt_holds_the_wise_ft_merge_of_the_trained_weights(reference_wiseft, tmp_path):
    """θ = (1 − α)·θ_start + α·θ_end computed here from the last task's "trained" checkpoint (its
    end weights and WiSE-FT's start weights) is what the uninterrupted run's last.ckpt holds."""
    _, _, trained = kill_and_resume(tmp_path, "wiseft", "task_trained:2")
    start = next(v for k, v in trained["callbacks"].items() if "WiSEFT" in k)["ref"]  # θ_ref: the task start
    final = load_last(reference_wiseft)["state_dict"]
    assert start and set(final) == {f"model.{n}" for n in start}
    for name, theta_start in start.items():
        merged = (1 - 0.9) * theta_start + 0.9 * trained["state_dict"][f"model.{name}"]
        assert torch.equal(final[f"model.{name}"], merged), name
    assert not all(torch.equal(final[f"model.{n}"], trained["state_dict"][f"model.{n}"]) for n in start)


LORA_POINTS = ["strategy_end:2", "strategy_end:4", "step:25"]  # after LoRA's merge of task 0 / 1; mid task 1


@pytest.mark.slow
@pytest.mark.parametrize("point", LORA_POINTS)
def test_kill_during_lora_task_end_then_resume_equals_uninterrupted(reference_lora, tmp_path, point):
    run, _, _ = kill_and_resume(tmp_path, "lora", point)
    assert_same_run(run, reference_lora)
    merged = [k for k in tensors(load_last(run)) if "/merged/" in k]
    assert merged  # the merged base weights are compared too
