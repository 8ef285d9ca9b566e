"""What a checkpoint holds, when it is written, and how a run continues from one.

A checkpoint must let a killed run continue as if it had never stopped. Lightning already saves
the loops (epoch = task position, batch progress), the optimizer and the LR scheduler (our
`TaskSchedule`, whose state includes the task's length and step). We add:

- the torch / Python / NumPy RNG states (Lightning saves none), stored as tensors and lists so
  the file still loads with ``torch.load(weights_only=True)``;
- only the *trainable* parameters: frozen ones are rebuilt from `model.pretrained` (or the tiny
  seed), so a SAProj checkpoint of a 7B model is the size of its attention projections;
- what the model was (family, recipe, trainable names) and the run's config, so a checkpoint from
  another run is refused with one line instead of half-loading (`mllm_cl.rundir`);
- how many micro-batches of the current task were consumed (`resume_offset`), so the seeded
  `TaskSampler` skips exactly those samples instead of restarting the task's data.

When ``last.ckpt`` is written (the state machine of a task; each state resumes exactly):

1. every ``checkpoint.every_n_train_steps`` inside the task ("mid-task"), except on the task's last
   batch: Lightning resumes a checkpoint of the last batch by skipping the task's end altogether;
2. at the very start of the task's end, before any task-end work ("trained": the trained weights,
   the task's row not recorded yet). A resume from it redoes the task end (`finish_interrupted_task`),
   so a kill during the merges or the post-task evaluation costs that evaluation, not the task;
3. after the task-end work: callbacks' merges (WiSE-FT), strategies' ``on_task_end`` (LoRA merge),
   the evaluation and the results files ("done"), whatever step checkpoints exist, so ``last.ckpt``
   is the model of the matrix's last row.

Every checkpoint file is written to a temporary file and renamed (`AtomicCheckpointIO`): a kill or
a full disk during the write leaves the previous ``last.ckpt`` whole.

Resuming: re-run the same command with ``--ckpt_path last`` (see `mllm_cl.rundir`).
"""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, EarlyStopping, ModelCheckpoint, ProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mllm_cl import faults
from mllm_cl.errors import ConfigError
from mllm_cl.results import atomic_file

_KEY = "mllm_cl_ckpt"


class TaskCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that writes ``last.ckpt`` at every task's end, before and after its end work.

    Lightning makes `every_n_train_steps` and `every_n_epochs` mutually exclusive; a stream wants
    both: periodic step checkpoints inside long tasks, and task-boundary ones (see the module doc).
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if not any(isinstance(c, TaskTrained) for c in trainer.callbacks):
            # First of all callbacks: its epoch-end hook runs before any other's (WiSE-FT's merge).
            trainer.callbacks.insert(0, TaskTrained(self))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        faults.point("step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            faults.point("last_step")
            return  # the "trained" checkpoint follows at once (state 2); see the module doc
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _save_checkpoint(self, trainer, filepath) -> None:
        """Lightning's save, then rank 0's full disk raised on every rank: only rank 0 writes a
        single-file checkpoint, and an error raised there before the save's barrier would leave the
        other ranks waiting in it."""
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, AtomicCheckpointIO):  # a CheckpointIO of the user's: its errors stay its own
            return super()._save_checkpoint(trainer, filepath)
        io.deferred = []
        try:
            super()._save_checkpoint(trainer, filepath)
        finally:
            errors, io.deferred = io.deferred, None
        faults.raise_on_every_rank(trainer, errors[0] if errors else None)

    def _skip(self, trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.state.fn != "fit" or trainer.sanity_checking

    def save_trained(self, trainer) -> None:
        """State 2: the task's trained weights, before its end work."""
        if self.save_last and not self._skip(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        faults.point("task_trained")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """State 3, after the module's task end (checkpoint callbacks run after the module)."""
        self._last_global_step_saved = -1  # the "trained" save at this step must not suppress these
        super().on_train_epoch_end(trainer, pl_module)  # per-epoch top-k (and last with it)
        if self.save_last and not self._skip(trainer) and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        faults.point("task_done")


class TaskTrained(Callback):
    """Marks the task as trained and writes the "trained" checkpoint, first thing at a task's end.

    Installed by `TaskCheckpoint` as the first callback; it is not a checkpoint callback itself so
    that it runs before the other callbacks' ``on_train_epoch_end`` (Lightning calls checkpoint
    callbacks after the LightningModule).
    """

    def __init__(self, checkpoint: TaskCheckpoint):
        self.checkpoint = checkpoint

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if getattr(pl_module, "replaying_task_end", False):
            return  # `finish_interrupted_task`: resumed from this very checkpoint
        pl_module.task_trained = trainer.current_epoch
        self.checkpoint.save_trained(trainer)


def finish_interrupted_task(trainer, module) -> None:
    """Redo the end of a task whose "trained" checkpoint we resumed from, then write its "done" one.

    Lightning resumes such a checkpoint at the next task and never calls ``on_train_epoch_end``
    again, so the task's end work is replayed here as Lightning runs it at a task's end (other
    callbacks, the module, then checkpoint callbacks), with ``trainer.current_epoch`` set back to
    that task meanwhile. Called from `MLLMModule.on_train_start`; for the stream's last task
    `restore_progress` raised ``max_epochs`` so that the fit loop still starts (put back here).
    """
    task = module.task_trained
    if task < 0 or len(module.results.rows) > task + 1 or trainer.state.fn != "fit":
        return
    if module.global_rank_zero():
        print(f"[mllm_cl] task {task} ({module.stream.tasks[task].name}) was trained but its end was "
              "interrupted: redoing its task-end work and evaluation")  # fmt: skip
    progress = trainer.fit_loop.epoch_progress.current
    saved, progress.completed = progress.completed, task
    previous_fx, module._current_fx_name = module._current_fx_name, "on_train_epoch_end"
    module.replaying_task_end = True
    try:
        for monitoring in (False, True):
            if monitoring:
                module.on_train_epoch_end()
            for callback in trainer.callbacks:
                if isinstance(callback, (Checkpoint, EarlyStopping)) == monitoring and not isinstance(
                    callback, ProgressBar
                ):
                    callback.on_train_epoch_end(trainer, module)
    finally:
        module.replaying_task_end = False
        module._current_fx_name = previous_fx
        progress.completed = saved
        trainer.fit_loop.max_epochs = len(module.stream.tasks)


def restore_progress(module, state: dict) -> None:
    """`task_trained` from a checkpoint; a "trained" checkpoint of the last task keeps the fit loop
    from ending before `finish_interrupted_task` (its epochs are all done in Lightning's eyes)."""
    module.task_trained = state.get("task_trained", -1)
    rows = len((state.get("results") or {}).get("matrix") or [])
    trainer = module._trainer
    if trainer is None or trainer.state.fn != "fit" or not 0 <= module.task_trained == rows - 1:
        return
    if module.task_trained == len(trainer.datamodule.tasks) - 1:
        trainer.fit_loop.max_epochs = len(trainer.datamodule.tasks) + 1


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to a temporary file in the checkpoint's folder, fsync, then rename over the file.

    (Lightning's own writer stages the file in the system temp dir and *copies* it when that is
    another file system, so a kill during the copy leaves a truncated ``last.ckpt``.)
    """

    deferred: list | None = None  # set by TaskCheckpoint: a full disk is raised after Lightning's barrier

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = str(path)
        if "://" in path:
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            with atomic_file(path, binary=True) as fh:
                torch.save(checkpoint, fh)
        except faults.DiskFullError as err:
            if self.deferred is None:
                raise
            self.deferred.append(err)


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
        # The run's config as JSON text (set by the CLI): a resume with another config is refused.
        **({"config": module.run_config} if getattr(module, "run_config", None) else {}),
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
    # Set at `restore_rng` (train start), not now: Lightning builds and iterates the train loader
    # in between, and each DataLoader iterator draws its seed from the global RNG.
    module.pending_rng = info.get("rng")


def restore_rng(module) -> None:
    """The checkpoint's RNG states, at train start: the random stream goes on as if never stopped."""
    state = getattr(module, "pending_rng", None)
    if state:
        set_rng_state(state)
    module.pending_rng = None


def resume_offset(trainer) -> int:
    """Micro-batches of the current task already trained, when resuming inside a task; else 0.

    A checkpoint written at `on_train_batch_end` has ``batch_progress.current.processed`` = the
    batches finished in this epoch (``completed`` is only incremented after the hook, and the
    epoch loop fixes it up later, after the dataloader was built).
    """
    loop = trainer.fit_loop
    epochs = loop.epoch_progress.current
    # Inside a task only when its epoch started and did not finish: a checkpoint of a task's end
    # (processed == started) resumes at the next task's first sample.
    if not loop.restarting or epochs.started <= epochs.processed:
        return 0
    return int(loop.epoch_loop.batch_progress.current.processed)


# ---- up-front checks (called by the CLI before fit) -----------------------------------------
def check_ckpt_file(path: str | None) -> dict | None:
    """One-line error for a missing, corrupt or unsafe checkpoint file (before any training).

    Returns the checkpoint, memory-mapped (tensors stay on disk), or None for no / a symbolic path.
    """
    if not path or path in ("last", "last_or_new", "best", "hpc", "registry"):
        return None
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
    return checkpoint
