"""The run directory: which one a command writes into, and who may write into it.

- ``fit --ckpt_path last`` continues the newest run directory that holds a checkpoint (with a fixed
  ``trainer.logger.init_args.version``: that directory) and says which in one line. When there is
  none it stops with one line, never silently starting from scratch; ``--ckpt_path last_or_new``
  starts a new run then instead.
- A resume is refused, in one line naming the differing keys, when the config differs from the
  run's in what it trains (``model.*``, ``data.*`` but the worker / cache options, the seed, the
  trainer's accumulation / precision / clipping, ``strategies.*`` callbacks such as WiSE-FT);
  ``--force-resume`` goes on anyway.
- ``validate`` / ``test`` write into the run directory of the checkpoint they score.
- One ``fit`` at a time per run directory: rank 0 holds an exclusive lock on ``.fit.lock`` (the
  kernel drops it when the process dies, so a killed run never blocks its resume; the file names
  the holder's pid for the message).
- A failed command removes the run directory it created when nothing worth keeping is in it (no
  checkpoint, no results), so bad-input retries leave no empty ``version_N`` folders behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import socket
import tempfile
import time
import warnings

from lightning.pytorch.utilities import rank_zero_only

from mllm_cl.checkpointing import check_ckpt_file
from mllm_cl.errors import ConfigError
from mllm_cl.results import recover_folders

LOCK = ".fit.lock"
_LOGGERS = ("TensorBoardLogger", "CSVLogger")
# What a resume may change without changing what is trained.
_IGNORED = (
    "data.num_workers",
    "data.cache_processed",
    "data.cache_dir",
    "data.validate",
    "data.max_unk_answers",
)
_TRAINER_KEYS = (
    "accumulate_grad_batches",
    "precision",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "callbacks",
)


# ---- where runs live ---------------------------------------------------------------------------
def _logger_args(section) -> dict | None:
    """init_args of a TensorBoard / CSV logger in a parsed config section (None: another layout)."""
    logger = section["trainer"].get("logger") if section.get("trainer") else None
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    if logger is None or isinstance(logger, bool) or not hasattr(logger, "get"):
        return None
    if not str(logger.get("class_path", "")).endswith(_LOGGERS):
        return None
    return logger.get("init_args")


def _run_dir(args, version) -> str:
    name = args.get("name")
    name = "lightning_logs" if name is None else name
    version = version if isinstance(version, str) else f"version_{version}"
    return os.path.join(str(args.get("save_dir") or "."), name or "", version)


def _last_in(folder: str) -> str | None:
    if rank_zero_only.rank == 0:
        recover_folders(folder)  # a distributed checkpoint's swap cut by a kill (mllm_cl.results)
    found = [p for p in glob.glob(os.path.join(glob.escape(folder), "last*.ckpt")) if os.path.exists(p)]
    return max(found, key=os.path.getmtime) if found else None


def _newest_with_checkpoint(args) -> tuple[str, str] | None:
    """(version dir name, last checkpoint) of the highest ``version_N`` that holds a checkpoint."""
    root = os.path.dirname(_run_dir(args, "x"))
    if not os.path.isdir(root):
        return None
    versions = [d for d in os.listdir(root) if d.startswith("version_") and d[8:].isdigit()]
    for version in sorted(versions, key=lambda d: int(d[8:]), reverse=True):
        last = _last_in(os.path.join(root, version, "checkpoints"))
        if last:
            return version, last
    return None


def resolve_ckpt_path(section, subcommand: str) -> str | None:
    """Turn ``last`` / ``last_or_new`` into a file and point the logger at that checkpoint's run
    directory (edits the parsed config `section` in place). Returns the checkpoint path or None."""
    ckpt_path = section.get("ckpt_path")
    args = _logger_args(section)
    if ckpt_path in ("last", "last_or_new"):
        dirpath = (section.get("checkpoint") or {}).get("dirpath")
        if dirpath:
            found = _last_in(dirpath)
            where = dirpath
        elif args is not None and args.get("version") is not None:
            found = _last_in(os.path.join(_run_dir(args, args["version"]), "checkpoints"))
            where = os.path.join(_run_dir(args, args["version"]), "checkpoints")
        elif args is not None:
            newest = _newest_with_checkpoint(args)
            found = newest[1] if newest else None
            if newest:
                args["version"] = newest[0]
            where = os.path.join(os.path.dirname(_run_dir(args, "x")), "version_*", "checkpoints")
        else:
            return ckpt_path  # a logger of another kind: Lightning's own lookup
        if found is None:
            return _nothing_to_resume(section, ckpt_path, where)
        ckpt_path = section["ckpt_path"] = found
        _say_resuming(subcommand, found, check_ckpt_file(found))
    if ckpt_path and subcommand in ("validate", "test") and args is not None:
        folder = os.path.dirname(os.path.abspath(ckpt_path))
        if os.path.basename(folder) == "checkpoints":  # <save_dir>/<name>/<version>/checkpoints/x.ckpt
            run = os.path.dirname(folder)
            args["save_dir"] = os.path.dirname(os.path.dirname(run))
            args["name"], args["version"] = os.path.basename(os.path.dirname(run)), os.path.basename(run)
    return ckpt_path


def _nothing_to_resume(section, ckpt_path: str, where: str) -> None:
    if ckpt_path == "last_or_new":
        print(f"[mllm_cl] --ckpt_path last_or_new: no checkpoint in {where}; starting a new run")
        section["ckpt_path"] = None
        return None
    raise ConfigError(
        f"--ckpt_path last: no checkpoint in {where}, nothing to resume; run without --ckpt_path to "
        "start a new run, or pass --ckpt_path last_or_new to start one whenever there is nothing to resume"
    )


def _say_resuming(subcommand: str, path: str, checkpoint: dict | None) -> None:
    state = (checkpoint or {}).get("mllm_cl") or {}
    rows = ((state.get("results") or {}).get("row_labels")) or []
    done = f"rows {rows}" if rows else "no rows yet"
    step = (checkpoint or {}).get("global_step", "?")
    verb = "resuming" if subcommand == "fit" else f"{subcommand} of"
    print(f"[mllm_cl] --ckpt_path last: {verb} {path} (global step {step}, {done})")


# ---- the run's config --------------------------------------------------------------------------
def run_config(section: dict) -> dict:
    """The part of a parsed fit config (as plain data) that decides what is trained."""
    trainer = dict(section.get("trainer") or {})
    callbacks = trainer.get("callbacks") or []
    # Callbacks that change what is trained are our strategies (WiSE-FT); monitors and exporters
    # may come and go between a run and its resume.
    trainer["callbacks"] = [
        c for c in (callbacks if isinstance(callbacks, list) else [callbacks])
        if str((c or {}).get("class_path", "")).startswith("strategies.")
    ]  # fmt: skip
    out = {
        "seed_everything": section.get("seed_everything"),
        "model": section.get("model"),
        "data": section.get("data"),
        "trainer": {k: trainer.get(k) for k in _TRAINER_KEYS},
    }
    return json.loads(json.dumps(out, default=str))


def _diff(old, new, key: str, out: list) -> None:
    if key in _IGNORED:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        # Only keys both configs have: an option added to (or dropped from) the code since the run
        # started is no change of the run's config.
        for k in sorted(set(old) & set(new), key=str):
            _diff(old[k], new[k], f"{key}.{k}" if key else str(k), out)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            _diff(a, b, f"{key}[{i}]", out)
    elif old != new:
        out.append(f"{key} ({_short(old)} -> {_short(new)})")


def _short(value) -> str:
    if isinstance(value, list):
        names = [v.get("name") for v in value if isinstance(v, dict)]
        return f"[{', '.join(map(str, names))}]" if names and None not in names else f"{len(value)} items"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_same_config(checkpoint: dict | None, current: dict, path: str, force: bool) -> None:
    """Refuse (one line naming the keys) to resume `checkpoint` with a config that trains otherwise."""
    stored = ((checkpoint or {}).get("mllm_cl_ckpt") or {}).get("config")
    if not stored:
        return  # a checkpoint from before configs were recorded: nothing to compare
    changes: list[str] = []
    _diff(json.loads(stored), current, "", changes)
    if not changes:
        return
    listed = ", ".join(changes[:6]) + (f" and {len(changes) - 6} more" if len(changes) > 6 else "")
    if force:
        print(f"[mllm_cl] --force-resume: continuing {path} with a changed config: {listed}")
        return
    run = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    raise ConfigError(
        f"--ckpt_path {path}: the run was trained with another config: {listed}; resume with the run's "
        f"config ({os.path.join(run, 'config.yaml')}) or pass --force-resume to go on with this one"
    )


# ---- one fit per run directory ----------------------------------------------------------------
def lock_run_dir(run_dir: str):
    """Exclusive lock of `run_dir` for this process (held until it exits), or a one-line refusal."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK)
    fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115  (held open for the life of the process)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown pid"
        fh.close()
        raise ConfigError(
            f"run directory {run_dir} is in use by another fit ({holder}); wait for it to end, or give "
            "this run another trainer.logger.init_args.version"
        ) from None
    except OSError:
        pass  # no flock on this file system: the pid check below stands in
    fh.seek(0)
    holder = fh.read().split()
    if holder and holder[0] == "pid" and _alive_elsewhere(holder):
        fh.close()
        raise ConfigError(
            f"run directory {run_dir} is in use by another fit ({' '.join(holder)}); wait for it to end"
        )
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    fh.flush()
    return fh


def _alive_elsewhere(holder: list[str]) -> bool:
    """A recorded holder that is another live process on this host (only consulted without flock)."""
    with contextlib.suppress(ValueError, IndexError):
        pid, host = int(holder[1]), holder[3]
        if pid != os.getpid() and host == socket.gethostname():
            try:
                os.kill(pid, 0)
                return True
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
    return False


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


class RunDir:
    """The run directory of one command: created by it or not, and its lock (fit only)."""

    def __init__(self, path: str | None):
        self.path = path
        self.existed = bool(path) and os.path.isdir(path)
        self.lock = None

    def release(self) -> None:
        """Drop the lock (the file stays: removing it could let two later fits lock two files)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def remove_if_empty(self) -> None:
        """After a failure: delete the folder this command created if nothing in it is worth keeping."""
        if rank_zero_only.rank != 0 or not self.path or self.existed or not os.path.isdir(self.path):
            return
        keep = ("results.json", "hf", "predictions")
        if any(os.path.exists(os.path.join(self.path, k)) for k in keep) or _has_files(
            os.path.join(self.path, "checkpoints")
        ):
            return
        if glob.glob(os.path.join(glob.escape(self.path), "eval_*.json")):
            return
        shutil.rmtree(self.path, ignore_errors=True)


def _has_files(folder: str) -> bool:
    return os.path.isdir(folder) and any(not n.startswith(".") for n in os.listdir(folder))


def _remove_partial_writes(run_dir: str) -> None:
    """Temporary files of writes a killed process never finished (we hold the lock: none is live)."""
    for pattern in ("**/.tmp-*", "**/.*.tmp-*"):
        for path in glob.glob(os.path.join(glob.escape(run_dir), pattern), recursive=True):
            with contextlib.suppress(OSError):
                os.unlink(path)


def prepare_fit(trainer, module, fit_args: dict, config_json: str | None, run: RunDir) -> None:
    """Before `fit` (LightningCLI.before_fit): safe loading, up-front checks, the run directory's lock.

    ``weights_only`` defaults to True: a checkpoint can hold no code (ours hold tensors and plain
    containers only). A bad checkpoint file or an unwritable log directory fails here, in one line.
    """
    if fit_args.get("weights_only") is None:
        fit_args["weights_only"] = True
    check_ckpt_file(fit_args.get("ckpt_path"))
    if fit_args.get("ckpt_path"):
        # Lightning warns that a plain DataLoader cannot resume mid-epoch; ours can: TaskSampler
        # skips the micro-batches already trained (resume_offset), which test_resume checks.
        warnings.filterwarnings(
            "ignore", message="You're resuming from a checkpoint that ended before the epoch"
        )
    logger = trainer.logger
    if logger is not None and getattr(logger, "save_dir", None):
        check_writable(logger.save_dir, "trainer.logger.init_args.save_dir")
    else:
        check_writable(trainer.default_root_dir, "trainer.default_root_dir")
    # A run directory of its own: a TensorBoard / CSV logger's version folder, or the root dir when
    # there is no logger (other loggers' save_dir may be shared by many runs: not locked).
    own_dir = logger is None or type(logger).__name__ in _LOGGERS
    if rank_zero_only.rank == 0 and run.path and own_dir:
        run.lock = lock_run_dir(run.path)
        _remove_partial_writes(run.path)
    module.run_config = config_json
