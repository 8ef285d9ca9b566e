"""Shared test helpers."""

from pathlib import Path

import lightning as L
import torch
import yaml

from mllm_cl.cli import main


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


def write_config(tmp: Path, name: str, model: dict, data: dict, **trainer) -> Path:
    """tmp/name.yaml from `model` / `data`: seed 0, deterministic CPU, TensorBoard run dir tmp/name/v;
    `trainer` adds or overrides trainer options."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "deterministic": True,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp), "name": name, "version": "v"},
            },
            **trainer,
        },
        "model": model,
        "data": data,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit_cli(tmp: Path, name: str, model: dict, data: dict) -> tuple[Path, dict]:
    """`python -m mllm_cl fit` on `write_config(...)`; the run dir and the last checkpoint's state_dict."""
    main(["fit", "--config", str(write_config(tmp, name, model, data))])
    run_dir = tmp / name / "v"
    return run_dir, torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
