"""Shared test helpers."""

import lightning as L


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
