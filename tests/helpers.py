"""Shared test helpers."""

from pathlib import Path

import lightning as L
import torch
import yaml

from mllm_cl.cli import main
from strategies.base import Strategy

ROOT = Path(__file__).resolve().parent.parent  # the repository root


def weights(module) -> dict[str, torch.Tensor]:
    """Copies of every parameter of `module.model`, by real name."""
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


class WeightSnapshots(L.Callback):
    """Every parameter at each task's start and at its end, as the callbacks listed after it see them
    (a callback's on_train_epoch_end runs before the module's post-task evaluation)."""

    def __init__(self):
        self.start: list[dict[str, torch.Tensor]] = []
        self.end: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.start.append(weights(pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        self.end.append(weights(pl_module))


class SeenByEval(Strategy):
    """A probe strategy: its on_task_end runs right before the post-task evaluation, so `seen[task]`
    holds the weights that evaluation scores (after every callback's merge)."""

    def __init__(self):
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_task_end(self, ctx, task):
        self.seen.append(weights(ctx))


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    """A real single-process CPU Trainer writing only under `tmp_path`, with no logger or checkpoints."""
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    return L.Trainer(**{**options, **kwargs})


def cli_config(
    save_dir: Path, name: str, model: dict, data: dict, version: str | None = None, **trainer
) -> dict:
    """A `fit` config: seed 0, one CPU device, no progress bar or summary, TensorBoard run dir
    save_dir/name/<version>; `trainer` adds or overrides trainer options."""
    logger = {"save_dir": str(save_dir), "name": name, **({"version": version} if version else {})}
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": logger},
    }
    return {"seed_everything": 0, "trainer": {**options, **trainer}, "model": model, "data": data}


def write_config(tmp: Path, name: str, model: dict, data: dict, **trainer) -> Path:
    """tmp/name.yaml: `cli_config` with deterministic algorithms and the run dir tmp/name/v."""
    path = tmp / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(cli_config(tmp, name, model, data, version="v", **{"deterministic": True, **trainer}))
    )
    return path


def fit_cli(tmp: Path, name: str, model: dict, data: dict) -> tuple[Path, dict]:
    """`python -m mllm_cl fit` on `write_config(...)`; the run dir and the last checkpoint's state_dict."""
    main(["fit", "--config", str(write_config(tmp, name, model, data))])
    run_dir = tmp / name / "v"
    return run_dir, torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
