"""Every YAML in configs/ parses with the CLI's own parser (no training, no network).

Configs are collected when the tests are collected, so a new config is covered without editing
this file. Configs that build a tiny model (no `model.pretrained`) are also instantiated; those
naming a hub checkpoint are only parsed, since instantiating them would fetch a processor.
"""

from __future__ import annotations

import pytest
import yaml

from mllm_cl.cli import MllmCLI, main
from mllm_cl.data.stream import TaskStream
from mllm_cl.module import MLLMModule
from strategies.freeze import Recipe
from tests.helpers import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


class _Parsed(Exception):
    """Raised by `_ParseOnly` after parsing, carrying the CLI object."""


class _ParseOnly(MllmCLI):
    """MllmCLI that stops after parsing: before any class is instantiated or anything runs."""

    def before_instantiate_classes(self):
        raise _Parsed(self)


def parse(args: list[str]) -> MllmCLI:
    try:
        _ParseOnly(MLLMModule, TaskStream, args=args)
    except _Parsed as parsed:
        return parsed.args[0]
    raise AssertionError("the CLI did not stop after parsing")


def test_there_are_configs():
    assert CONFIGS, "configs/ holds no *.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_header_says_how_to_run_it(path):
    head = path.read_text().splitlines()[:10]
    comments = [line for line in head if line.lstrip().startswith("#")]
    assert any("python -m mllm_cl" in line for line in comments), (
        f"{path.name}: the first lines need a comment saying how to run it (python -m mllm_cl ...)"
    )


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_with_the_cli_parser(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything relative a logger or callback might create stays here
    # Trainer-only configs (no data:) are meant to be combined with a model/data config.
    base = [] if "data" in yaml.safe_load(path.read_text()) else [ROOT / "configs" / "tiny_llava_test.yaml"]
    cli = parse(["fit", *[a for b in base for a in ("--config", str(b))], "--config", str(path)])
    fit = cli.config.fit
    raw = yaml.safe_load((base[0] if base else path).read_text())
    assert fit.model.family == raw["model"]["family"]
    assert len(fit.data.tasks) == len(raw["data"]["tasks"]) > 0

    if fit.model.pretrained:
        return  # a hub checkpoint: parsing is all we can do offline
    init = cli.parser.instantiate_classes(cli.config).fit
    assert isinstance(init.model, MLLMModule) and isinstance(init.data, TaskStream)
    assert isinstance(init.model.recipe, Recipe)
    assert [t.name for t in init.data.tasks] == [t["name"] for t in raw["data"]["tasks"]]


def write_config(tmp_path, edit) -> str:
    config = yaml.safe_load((ROOT / "configs" / "tiny_llava_test.yaml").read_text())
    edit(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_unknown_class_path_exits_naming_it(tmp_path, capsys):
    path = write_config(tmp_path, lambda c: c["model"].update(recipe={"class_path": "NoSuchRecipe"}))
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", path, "--trainer.default_root_dir", str(tmp_path)])
    assert info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "NoSuchRecipe" in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_recipe_matching_nothing_exits_with_one_error_line(tmp_path, capsys):
    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "tiny_llava_test.yaml"),
        "--model.recipe",
        "Patterns",
        "--model.recipe.patterns",
        '["^nothing"]',
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
    ]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "Patterns" in errors[0] and "^nothing" in errors[0] and "Traceback" not in errors[0]
