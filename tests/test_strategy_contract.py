"""Every strategy builds from YAML through the CLI, trains a 2-task tiny
stream on both families, and restores its checkpointed state into a fresh module. Plus the L2Anchor
example and a run that composes recipe + LwF + data-hybrid + WiSE-FT through the real CLI.

A new Strategy subclass in the `strategies` package must add its YAML snippet to SNIPPETS below.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import strategies
from mllm_cl.cli import MllmCLI, main
from mllm_cl.data import TaskStream
from mllm_cl.module import MLLMModule
from strategies.base import Strategy
from strategies.freeze import Recipe, SAProj
from strategies.l2_anchor import L2Anchor
from tests.helpers import ROOT, cli_config

SHAPE = {"class_path": "Synthetic", "init_args": {"skill": "shape", "n": 8, "seed": 6, "image_size": 32}}
# class name -> (where in the config, YAML entry)
SNIPPETS = {
    "LwF": ("model.strategies", {"class_path": "LwF", "init_args": {"lam": 1.0, "temperature": 2.0}}),
    "DataHybrid": (
        "model.strategies",
        {"class_path": "DataHybrid", "init_args": {"sources": [SHAPE], "ratios": [0.25]}},
    ),
    "Replay": (
        "model.strategies",
        {"class_path": "Replay", "init_args": {"size": 4, "ratio": 0.25, "policy": "balanced"}},
    ),
    "LoRA": ("model.strategies", {"class_path": "LoRA", "init_args": {"r": 2, "alpha": 4}}),
    "L2Anchor": ("model.strategies", {"class_path": "L2Anchor", "init_args": {"lam": 0.1}}),
    "WiSEFT": ("model.strategies", {"class_path": "WiSEFT", "init_args": {"alpha": 0.5}}),
}


def discovered() -> set[str]:
    names = set()
    for info in pkgutil.iter_modules(strategies.__path__):
        module = importlib.import_module(f"strategies.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Strategy) and cls is not Strategy and not issubclass(cls, Recipe):
                names.add(cls.__name__)
    return names


def test_every_strategy_has_a_snippet():
    assert discovered() == set(SNIPPETS)


def config_for(name: str, family: str, tmp_path: Path) -> Path:
    def src(skill, seed, n):
        return {
            "class_path": "Synthetic",
            "init_args": {"skill": skill, "n": n, "seed": seed, "image_size": 32},
        }

    where, entry = SNIPPETS[name]
    model = {
        "family": family,
        "tiny": "tiny",
        "recipe": {"class_path": "SAProj"},
        "lr": 1e-3,
        "strategies": [entry] if where == "model.strategies" else [],
    }
    data = {
        "batch_size": 2,
        "eval_batch_size": 4,
        "eval_limit": 2,
        "tasks": [
            {"name": "count", "train": src("count", 1, 8), "eval": src("count", 2, 2), "steps": 2},
            {"name": "colour", "train": src("colour", 3, 8), "steps": 2},
        ],
    }
    callbacks = [entry] if where == "trainer.callbacks" else []
    config = cli_config(tmp_path / "runs", name, model, data, callbacks=callbacks)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def build(path: Path) -> MllmCLI:
    return MllmCLI(
        MLLMModule,
        TaskStream,
        args=["--config", str(path)],
        run=False,
        save_config_kwargs={"overwrite": True},
    )


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_strategy_trains_and_its_state_restores(name, family, tmp_path):
    path = config_for(name, family, tmp_path)
    cli = build(path)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 4 and len(cli.model.results.rows) == 3
    ckpt_path = tmp_path / "state.ckpt"
    cli.trainer.save_checkpoint(ckpt_path)
    ckpt = torch.load(
        ckpt_path, map_location="cpu", weights_only=True
    )  # strategy states are weights_only-safe

    fresh = build(path)
    fresh.model.configure_model()
    fresh.model.on_load_checkpoint(ckpt)
    pairs = [
        (o.state_dict(), n.state_dict())
        for o, n in zip(cli.model.strategies, fresh.model.strategies, strict=True)
    ]
    for old_state, new_state in pairs:
        assert same(old_state, new_state)


def test_l2_anchor_value_and_gradient():
    anchor = L2Anchor(lam=0.3)
    module = MLLMModule(family="llava", recipe=SAProj(), strategies=[anchor])
    module.configure_model()
    anchor.on_task_start(module.context, 0)
    assert anchor.loss(module.context, {}, None).item() == 0.0
    gen = torch.Generator().manual_seed(0)
    params = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    term = anchor.loss(module.context, {}, None)
    by_hand = 0.15 * sum(float(((p - anchor.anchor[n]) ** 2).sum()) for n, p in params.items())
    assert term.item() == pytest.approx(by_hand, rel=1e-5)
    term.backward()
    for n, p in params.items():
        torch.testing.assert_close(p.grad, 0.3 * (p.detach() - anchor.anchor[n]))


def compose_config(tmp_path: Path) -> Path:
    """configs/tiny_compose_test.yaml; a WiSEFT entry that chooses α on the reported held-out sets (the
    legacy `criterion` without validation sets) gets the explicit allow_select_on_reported it now needs."""
    config = yaml.safe_load((ROOT / "configs" / "tiny_compose_test.yaml").read_text())
    entries = [*config["trainer"].get("callbacks", []), *config["model"].get("strategies", [])]
    for entry in entries:
        args = entry.get("init_args", {})
        if entry["class_path"].endswith("WiSEFT") and not args.get("validation"):
            args["allow_select_on_reported"] = True
    path = tmp_path / "tiny_compose_test.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_recipe_lwf_hybrid_wiseft_compose_through_the_cli(tmp_path):
    main(
        [
            "fit",
            "--config",
            str(compose_config(tmp_path)),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.log_every_n_steps",
            "1",
        ]
    )
    (run,) = list((tmp_path / "runs").glob("*/version_*"))
    results = json.loads((run / "results.json").read_text())
    assert results["row_labels"] == ["base", "count", "colour"]
    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/LwF",
        "train/ce",
        "wise_ft/alpha",
    } <= tags
    assert any(t.startswith("wise_ft/alpha_0.5/") for t in tags) and any(
        t.startswith("wise_ft/alpha_1/") for t in tags
    )
    assert [s.step for s in events.Scalars("wise_ft/alpha")] == [0, 1]
    assert any(
        s.value > 0 for s in events.Scalars("train/LwF")
    )  # the teacher differs from the student after a step
