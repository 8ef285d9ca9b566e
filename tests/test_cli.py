"""The command layer: one usage listing every subcommand, and one error policy."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mllm_cl.cli import COMMANDS, main
from tests.helpers import ROOT

EXPECTED = ("fit", "validate", "test", "plan", "report", "export", "cache", "probe")


def test_help_lists_every_subcommand_with_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "mllm_cl", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    listed = {}
    for line in out.stdout.splitlines():
        words = line.split()
        if line.startswith("  ") and words and words[0] in EXPECTED:
            listed[words[0]] = " ".join(words[1:])
    assert set(listed) == set(EXPECTED)
    assert all(len(text) > 10 for text in listed.values())


@pytest.mark.parametrize("name", [n for n, (target, _) in COMMANDS.items() if target])
def test_every_registered_command_resolves(name, capsys):
    # --help of each non-Lightning subcommand runs its own parser and exits 0.
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert "usage" in capsys.readouterr().out.lower() or name == "cache"


def test_no_arguments_prints_usage_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2
    assert "commands:" in capsys.readouterr().out


def test_a_fit_prints_no_notice_a_user_cannot_act_on(tmp_path):
    out = subprocess.run(
        [
            sys.executable, "-m", "mllm_cl", "fit", "--config", str(ROOT / "configs" / "tiny_llava_test.yaml"),
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--trainer.default_root_dir={tmp_path}",
            "--data.eval_limit=2",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "[mllm_cl] after colour:" in text  # the run did happen
    for notice in (
        "LightningCLI's args parameter",
        "Setting it to 1000 epochs",
        "litlogger",
        "across ranks is zero",
        "smaller than the logging interval",
        "Modules in eval mode",
        "LeafSpec",
        "requires torchvision",
    ):
        assert notice not in text, notice


def test_no_logger_parses(tmp_path):
    from mllm_cl.cli import MllmCLI
    from mllm_cl.data.stream import TaskStream
    from mllm_cl.module import MLLMModule

    config = str(ROOT / "configs" / "tiny_llava_test.yaml")
    cli = MllmCLI(MLLMModule, TaskStream, args=["--config", config, "--trainer.logger=false"], run=False)
    assert cli.trainer.logger is None


def test_ckpt_path_last_finds_a_run_named_by_its_method(tmp_path, capsys):
    """A run whose TensorBoard logger is not named is named by its method (runs/saproj/...); `--ckpt_path
    last` looks for the run under that name (it looked under the default name and found nothing)."""
    import yaml

    from tests.helpers import cli_config

    synthetic = {
        "class_path": "Synthetic",
        "init_args": {"skill": "colour", "n": 4, "seed": 1, "image_size": 32},
    }
    model = {"family": "llava", "recipe": {"class_path": "SAProj"}, "max_new_tokens": 2}
    data = {"batch_size": 2, "tasks": [{"name": "c", "train": synthetic, "eval": synthetic, "steps": 2}]}
    config = cli_config(tmp_path, "unused", model, data)
    del config["trainer"]["logger"]  # the default logger: runs named by method
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["fit", "--config", str(path), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    main(args)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["saproj"]
    capsys.readouterr()
    main([*args, "--ckpt_path", "last"])
    out = capsys.readouterr().out
    last = tmp_path / "runs" / "saproj" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"--ckpt_path last: resuming {last} (global step 2, rows ['base', 'c'])" in out
    assert [p.name for p in (tmp_path / "runs" / "saproj").iterdir()] == ["version_0"]  # no new run
