"""What a checkpoint holds, and how a run continues from one.

A checkpoint must let a killed run continue as if it had never stopped. Lightning already saves
the loops (epoch = task position, batch progress), the optimizer and the LR scheduler (our
`TaskSchedule`, whose state includes the task's length and step). We add:

- the torch / Python / NumPy RNG states (Lightning saves none), stored as tensors and lists so
  the file still loads with ``torch.load(weights_only=True)``;
- only the *trainable* parameters: frozen ones are rebuilt from `model.pretrained` (or the tiny
  seed), so a SAProj checkpoint of a 7B model is the size of its attention projections;
- what the model was (family, recipe, trainable names) so a checkpoint from another run is
  refused with one line instead of half-loading;
- how many micro-batches of the current task were consumed (`resume_offset`), so the seeded
  `TaskSampler` skips exactly those samples instead of restarting the task's data.

Resuming: re-run the same command with ``--ckpt_path last`` (Lightning picks the newest
``last.ckpt`` of the ModelCheckpoint callback). The run directory is the logger's
``save_dir/name/version``: fix ``trainer.logger.init_args.version`` in the config so the resumed
run writes into the same directory.
"""

from __future__ import annotations

import os
import random
import tempfile
import warnings

import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mllm_cl.errors import ConfigError

_KEY = "mllm_cl_ckpt"


class TaskCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes ``last.ckpt`` at the end of every task (epoch).

    Lightning makes `every_n_train_steps` and `every_n_epochs` mutually exclusive; a stream wants
    both: periodic step checkpoints inside long tasks, and one at each task boundary.
    """

    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)
        # Lightning 2.6 writes last.ckpt at epoch end only when a top-k checkpoint was written at the
        # same step; with save_top_k=0 (our default) that never happens, so write it here.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# ---- RNG -------------------------------------------------------------------------------------
def rng_state() -> dict:
    """torch / Python / NumPy RNG states in weights_only-safe types (tensors, lists, ints)."""
    py_version, py_state, py_gauss = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


# ---- save / load hooks (called from MLLMModule) ---------------------------------------------
def trainable_names(module) -> list[str]:
    return [f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad]


def load_any(path: str) -> dict:
    """A training checkpoint as one dict: a .ckpt file, or an FSDP2 distributed checkpoint folder
    (its shards gathered on CPU in this process, no process group needed)."""
    if not os.path.isdir(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, os.path.join(tmp, "full.pt"))
        checkpoint = torch.load(os.path.join(tmp, "full.pt"), map_location="cpu", weights_only=True)
    checkpoint.update(torch.load(os.path.join(path, "meta.pt"), map_location="cpu", weights_only=True))
    return checkpoint


def on_save(module, checkpoint: dict) -> None:
    """Drop frozen parameters and add RNG + identity; `checkpoint["state_dict"]` is edited in place."""
    keep = set(trainable_names(module))
    state = checkpoint.get("state_dict", {})
    frozen = [k for k in state if k.startswith("model.") and k not in keep]
    for k in frozen:
        del state[k]
    checkpoint[_KEY] = {
        "family": module.family.name,
        "recipe": type(module.recipe).__name__,
        "trainable": sorted(keep),
        "frozen_dropped": len(frozen),
        "rng": rng_state(),
    }


def on_load(module, checkpoint: dict, where: str = "checkpoint") -> None:
    """Refuse a checkpoint of another model; restore RNG. Frozen weights stay as built."""
    info = checkpoint.get(_KEY)
    if info is None or "state_dict" not in checkpoint:
        raise ConfigError(f"{where}: not an mllm_cl training checkpoint; pass a .ckpt written by `fit`")
    if info["family"] != module.family.name or info["recipe"] != type(module.recipe).__name__:
        raise ConfigError(
            f"{where}: made for family {info['family']} / recipe {info['recipe']}, config has "
            f"{module.family.name} / {type(module.recipe).__name__}; use the checkpoint's config"
        )
    params = dict(module.named_parameters())
    want = set(trainable_names(module))
    saved = set(checkpoint["state_dict"])
    for key in sorted(saved | want):
        if key not in params and key.startswith("model."):
            raise ConfigError(
                f"{where}: parameter {key} does not exist in this model; use the checkpoint's config"
            )
        if key not in saved and key in want:
            raise ConfigError(f"{where}: trainable parameter {key} is missing; use the checkpoint's config")
        if key in saved and key in params and checkpoint["state_dict"][key].shape != params[key].shape:
            raise ConfigError(
                f"{where}: {key} has shape {tuple(checkpoint['state_dict'][key].shape)}, "
                f"model has {tuple(params[key].shape)}; use the checkpoint's config (model.tiny / pretrained)"
            )
    # Frozen parameters are absent on purpose; Lightning loads with strict=module.strict_loading.
    module.strict_loading = False
    if info.get("rng"):
        set_rng_state(info["rng"])


def resume_offset(trainer) -> int:
    """Micro-batches of the current task already trained, when resuming inside a task; else 0.

    A checkpoint written at `on_train_batch_end` has ``batch_progress.current.processed`` = the
    batches finished in this epoch (``completed`` is only incremented after the hook, and the
    epoch loop fixes it up later, after the dataloader was built).
    """
    loop = trainer.fit_loop
    if not loop.restarting:
        return 0
    return int(loop.epoch_loop.batch_progress.current.processed)


# ---- up-front checks (called by the CLI before fit) -----------------------------------------
def check_ckpt_file(path: str | None) -> None:
    """One-line error for a missing, corrupt or unsafe checkpoint file (before any training)."""
    if not path or path in ("last", "best", "hpc", "registry"):
        return
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta.pt")):
        path = os.path.join(path, "meta.pt")  # FSDP2 distributed checkpoint: check its metadata file
    if not os.path.isfile(path):
        raise ConfigError(f"--ckpt_path {path}: file not found; pass a .ckpt written by `fit` or 'last'")
    try:
        # mmap: only the pickle is read, tensors stay on disk; weights_only: no code runs.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001  (any unpickling failure means the same thing to the user)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"--ckpt_path {path}: not a loadable checkpoint ({first[:160]}); pass a .ckpt written by `fit`"
        ) from err
    if not isinstance(checkpoint, dict) or _KEY not in checkpoint:
        raise ConfigError(
            f"--ckpt_path {path}: not an mllm_cl training checkpoint; pass a .ckpt written by `fit`"
        )


def check_writable(folder: str, what: str) -> None:
    """One-line error when `folder` cannot be created or written (before any training)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"{what}={folder}: cannot write there ({err.strerror or err}); choose a writable directory"
        ) from err


def prepare_fit(trainer, fit_args: dict) -> None:
    """Before `fit` (LightningCLI.before_fit): safe loading, the run directory, and up-front checks.

    - ``weights_only`` defaults to True: a checkpoint can hold no code (ours hold tensors and
      plain containers only);
    - with ``--ckpt_path last`` and no fixed ``trainer.logger.init_args.version``, the run
      continues in the newest existing version directory instead of opening a new one;
    - a bad checkpoint file or an unwritable log directory fails here, in one line.
    """
    if fit_args.get("weights_only") is None:
        fit_args["weights_only"] = True
    ckpt_path = fit_args.get("ckpt_path")
    logger = trainer.logger
    if ckpt_path == "last" and logger is not None and getattr(logger, "_version", 0) is None:
        latest = _latest_version(logger)
        if latest is not None:
            logger._version = latest
    check_ckpt_file(ckpt_path)
    if ckpt_path:
        # Lightning warns that a plain DataLoader cannot resume mid-epoch; ours can: TaskSampler
        # skips the micro-batches already trained (resume_offset), which test_resume checks.
        warnings.filterwarnings(
            "ignore", message="You're resuming from a checkpoint that ended before the epoch"
        )
    if logger is not None and getattr(logger, "save_dir", None):
        check_writable(logger.save_dir, "trainer.logger.init_args.save_dir")
    else:
        check_writable(trainer.default_root_dir, "trainer.default_root_dir")


def _latest_version(logger) -> int | None:
    """Newest ``version_N`` under the logger's root dir (TensorBoardLogger / CSVLogger layout)."""
    root = getattr(logger, "root_dir", None)
    if not root or not os.path.isdir(root):
        return None
    versions = [
        int(d.split("_", 1)[1])
        for d in os.listdir(root)
        if d.startswith("version_") and d.split("_", 1)[1].isdigit()
    ]
    return max(versions) if versions else None
