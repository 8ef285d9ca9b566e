"""Faults beyond a kill: a full disk, two fits on one run directory, a resume with another config,
``--ckpt_path last`` with nothing (or something older) to resume, failed fits, and file modes.

Each test runs the real CLI on a tiny model. A full disk is simulated at the write itself with
``MLLM_CL_ENOSPC_AT=write.<file>:<n>`` (`mllm_cl.faults`): the n-th atomic write of that file
raises ``OSError(ENOSPC)`` after its temporary file was written, before the rename.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mllm_cl import faults
from mllm_cl.cli import main
from tests.helpers import cli_config

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4


def write_config(tmp: Path, version: str | None = "v", every: int | None = 2, **data_over) -> Path:
    """Two 4-step tasks on a tiny LLaVA; run dir tmp/runs/f/<version> (version_N when None)."""
    syn = {"class_path": "Synthetic", "init_args": {"skill": "colour", "n": 4, "seed": 1, "image_size": 32}}
    tasks = [{"name": f"t{i}", "train": syn, "eval": syn, "steps": STEPS} for i in range(2)]
    model = {"family": "llava", "recipe": {"class_path": "SAProj"}, "max_new_tokens": 2}
    data = {"batch_size": 2, "eval_batch_size": 4, "tasks": tasks, **data_over}
    config = cli_config(tmp / "runs", "f", model, data, version=version, deterministic=True)
    if every:
        config["checkpoint"] = {"every_n_train_steps": every}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(autouse=True)
def fresh_fault_counts(monkeypatch):
    faults._seen.clear()
    for var in faults.ACTIONS:
        monkeypatch.delenv(var, raising=False)
    yield
    faults._seen.clear()


def fails(capsys, args: list[str]) -> str:
    """Run the CLI expecting exit 2 and one ``error:`` line; that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    return last


def rows(run: Path) -> list[str]:
    return json.loads((run / "results.json").read_text())["row_labels"]


def partial_writes(run: Path) -> list[Path]:
    return [*run.rglob(".tmp-*"), *run.rglob(".*.tmp-*")]


# ---- a full disk ---------------------------------------------------------------------------------
def test_disk_full_writing_results_keeps_the_earlier_file_and_stops_in_one_line(
    tmp_path, capsys, monkeypatch
):
    config = write_config(tmp_path)
    run = tmp_path / "runs" / "f" / "v"
    monkeypatch.setenv("MLLM_CL_ENOSPC_AT", "write.results.json:2")  # task 0's row
    last = fails(capsys, ["fit", "--config", str(config)])
    assert "disk full while writing" in last and str(run / "results.json") in last, last
    assert rows(run) == ["base"]  # the base row's file, whole
    assert not partial_writes(run)
    # The checkpoints are untouched by the failed results write: the run continues once space is free.
    monkeypatch.delenv("MLLM_CL_ENOSPC_AT")
    main(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert rows(run) == ["base", "t0", "t1"]


def test_disk_full_writing_a_checkpoint_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path)
    run = tmp_path / "runs" / "f" / "v"
    monkeypatch.setenv("MLLM_CL_ENOSPC_AT", "write.last.ckpt:2")  # saves: step 2, then task 0 trained (4)
    last = fails(capsys, ["fit", "--config", str(config)])
    assert "disk full while writing" in last and "last.ckpt" in last, last
    kept = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 2  # the step-2 checkpoint, loadable and whole
    assert not partial_writes(run)
    monkeypatch.delenv("MLLM_CL_ENOSPC_AT")
    main(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert rows(run) == ["base", "t0", "t1"]


# ---- two fits on one run directory ---------------------------------------------------------------
def _cli(config: Path, *extra: str, **env) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return [sys.executable, "-m", "mllm_cl", "fit", "--config", str(config), *extra], env


def test_a_second_fit_on_a_run_in_progress_is_refused_and_a_killed_ones_lock_is_stale(tmp_path, capsys):
    config = write_config(tmp_path)
    run = tmp_path / "runs" / "f" / "v"
    cmd, env = _cli(config, MLLM_CL_PAUSE_AT="task_done:1")
    first = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        for line in first.stderr:  # until it holds the run dir, paused after task 0's checkpoint
            if "paused at task_done" in line:
                break
        else:
            pytest.fail(f"the first fit ended early with {first.wait()}")
        refusal = fails(capsys, ["fit", "--config", str(config), "--ckpt_path", "last"])
        assert refusal.startswith("error: run directory") and f"pid {first.pid}" in refusal, refusal
        assert rows(run) == ["base", "t0"]  # the second fit wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert f"pid {first.pid}" in (run / ".fit.lock").read_text()  # left behind by the killed fit...
    main(["fit", "--config", str(config), "--ckpt_path", "last"])  # ... and it does not block the resume
    assert rows(run) == ["base", "t0", "t1"]


# ---- resuming with another config ----------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    config = write_config(tmp)
    main(["fit", "--config", str(config)])
    return tmp, config


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--seed_everything", "1"], "seed_everything (0 -> 1)"),
        (["--data.seed", "3"], "data.seed (0 -> 3)"),
        (["--model.recipe", "Full"], "model.recipe.class_path ('strategies.SAProj' -> 'strategies.Full')"),
        (["--model.lr", "0.1"], "model.lr (5e-06 -> 0.1)"),
        (["--trainer.callbacks+=WiSEFT"], "trainer.callbacks (0 items -> 1 items)"),
    ],
)
def test_resume_with_another_config_is_refused_naming_the_keys(finished, capsys, change, named):
    tmp, config = finished
    before = (tmp / "runs" / "f" / "v" / "results.json").read_bytes()
    last = fails(capsys, ["fit", "--config", str(config), "--ckpt_path", "last", *change])
    assert named in last and "--force-resume" in last, last
    assert (tmp / "runs" / "f" / "v" / "results.json").read_bytes() == before


def test_resume_with_another_task_list_is_refused(finished, tmp_path, capsys):
    _, config = finished
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["tasks"] = cfg["data"]["tasks"][:1]
    other = tmp_path / "one_task.yaml"
    other.write_text(yaml.safe_dump(cfg))
    last = fails(capsys, ["fit", "--config", str(other), "--ckpt_path", "last"])
    assert "data.tasks ([t0, t1] -> [t0])" in last, last


def test_resume_may_add_a_callback_that_trains_nothing(finished, capsys):
    _, config = finished
    main(
        [
            "fit",
            "--config",
            str(config),
            "--ckpt_path",
            "last",
            "--trainer.callbacks+=mllm_cl.export.ExportHF",
        ]
    )
    assert "--ckpt_path last: resuming" in capsys.readouterr().out


def test_force_resume_goes_on_with_the_new_config(finished, capsys):
    _, config = finished
    main(["fit", "--config", str(config), "--ckpt_path", "last", "--data.seed", "3", "--force-resume"])
    out = capsys.readouterr().out
    assert "--force-resume: continuing" in out and "data.seed (0 -> 3)" in out


# ---- --ckpt_path last: which run, or none -------------------------------------------------------
def test_ckpt_path_last_with_nothing_to_resume_stops_in_one_line(tmp_path, capsys):
    config = write_config(tmp_path, version=None)
    last = fails(capsys, ["fit", "--config", str(config), "--ckpt_path", "last"])
    assert "no checkpoint in" in last and "last_or_new" in last, last
    assert not list((tmp_path / "runs").rglob("version_*"))  # nothing started, nothing left behind


def test_ckpt_path_last_or_new_starts_a_run_when_there_is_nothing(tmp_path, capsys):
    config = write_config(tmp_path, version=None, every=None)
    main(["fit", "--config", str(config), "--ckpt_path", "last_or_new"])
    assert "starting a new run" in capsys.readouterr().out
    assert rows(tmp_path / "runs" / "f" / "version_0") == ["base", "t0", "t1"]


def test_ckpt_path_last_takes_the_newest_run_with_a_checkpoint(tmp_path, capsys):
    config = write_config(tmp_path, version=None, every=None)
    main(["fit", "--config", str(config)])
    (tmp_path / "runs" / "f" / "version_1").mkdir()  # newer, no checkpoint (e.g. a validate run's)
    capsys.readouterr()
    main(["fit", "--config", str(config), "--ckpt_path", "last"])
    said = [line for line in capsys.readouterr().out.splitlines() if "--ckpt_path last:" in line]
    assert len(said) == 1 and str(tmp_path / "runs" / "f" / "version_0" / "checkpoints") in said[0], said
    assert sorted(p.name for p in (tmp_path / "runs" / "f").iterdir()) == ["version_0", "version_1"]


def test_failed_fits_leave_no_empty_version_folders(tmp_path, capsys):
    broken = {"class_path": "Synthetic", "init_args": {"skill": "no_such_skill", "n": 4}}
    config = write_config(tmp_path, version=None, tasks=[{"name": "t", "train": broken, "steps": 2}])
    for _ in range(3):
        fails(capsys, ["fit", "--config", str(config)])
    assert not (tmp_path / "runs" / "f").exists() or not list((tmp_path / "runs" / "f").iterdir())


# ---- files others can read -------------------------------------------------------------------------
def test_exported_files_are_readable_by_others(tmp_path):
    from mllm_cl.export import export_hf
    from mllm_cl.families import get_family

    model, processor = get_family("llava").build_tiny("tiny")
    previous = os.umask(0o022)  # the usual umask; the files must not come out 0600 whatever the writer
    try:
        export_hf(model, processor, str(tmp_path / "hf"), "llava")
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "hf").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert all(mode == 0o644 for mode in modes.values()), modes


def test_options_added_to_the_code_since_the_run_started_are_no_config_change():
    from mllm_cl.errors import ConfigError
    from mllm_cl.rundir import check_same_config

    stored = {"data": {"seed": 0, "tasks": [{"name": "a"}]}, "model": {"lr": 0.1}}
    checkpoint = {"mllm_cl_ckpt": {"config": json.dumps(stored)}}
    newer = {"data": {"seed": 0, "tasks": [{"name": "a"}], "new_option": True}, "model": {"lr": 0.1}}
    check_same_config(checkpoint, newer, "x/checkpoints/last.ckpt", force=False)  # no error
    with pytest.raises(ConfigError, match=r"model\.lr \(0\.1 -> 0\.2\)"):
        check_same_config(checkpoint, {**newer, "model": {"lr": 0.2}}, "x/checkpoints/last.ckpt", force=False)
