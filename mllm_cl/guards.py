"""Run-time guards: non-finite losses, and errors reduced to the one line a user needs.

`nonfinite_loss` (an `MLLMModule` argument) decides what a NaN / inf loss does:
"stop" raises `NonFiniteLossError` naming the task and step (the default: a diverged run should
not keep writing checkpoints), "skip" drops the batch (``training_step`` returns None, so
Lightning does no backward and AdamW skips every parameter) and counts it in
``train/nonfinite_skipped``.
"""

from __future__ import annotations

import difflib
import re

import torch

from mllm_cl.errors import ConfigError, MllmClError

NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteLossError(MllmClError, FloatingPointError):
    """The training loss became NaN or infinite."""


def check_policy(policy: str) -> None:
    if policy not in NONFINITE_POLICIES:
        raise ConfigError(f"model.nonfinite_loss={policy!r}; use one of {list(NONFINITE_POLICIES)}")


def guard_loss(module, loss: torch.Tensor, policy: str) -> torch.Tensor | None:
    """`loss` if finite; otherwise raise ("stop") or return None and count it ("skip")."""
    if bool(torch.isfinite(loss.detach()).all()):
        return loss
    task = module.current_epoch
    name = module.stream.tasks[task].name if module._trainer is not None else "?"
    where = f"task {task} ({name}) step {module.global_step}"
    if policy == "stop":
        raise NonFiniteLossError(
            f"{where}: training loss is {loss.item()}; lower model.lr, check that task's data, "
            "or set model.nonfinite_loss: skip"
        )
    module.nonfinite_skipped = getattr(module, "nonfinite_skipped", 0) + 1
    module.log("train/nonfinite_skipped", float(module.nonfinite_skipped))
    return None


# "Caught DataError in DataLoader worker process 0. Original Traceback ...": PyTorch re-raises
# a worker's exception in the main process with the whole worker traceback as its message.
_QUALIFIED = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception): ")


def one_line(err: BaseException) -> str:
    """The user-facing line of `err` (the original message when it came from a worker)."""
    text = str(err).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if len(lines) == 1:
        return lines[0]
    return _QUALIFIED.sub("", lines[-1].strip(), count=1)


def user_error(err: BaseException) -> BaseException | None:
    """The `MllmClError` behind `err` (jsonargparse re-raises an `__init__`'s ConfigError as a
    ValueError), or a full-disk `OSError`; None when `err` is a bug to show with its traceback."""
    from mllm_cl.faults import DiskFullError, is_disk_full

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, MllmClError):
            return err
        if is_disk_full(err):
            where = getattr(err, "filename", None) or "the run directory"
            return DiskFullError(f"disk full while writing {where} ({err}); free some space, then "
                                 "continue with --ckpt_path last")  # fmt: skip
        err = err.__cause__ or err.__context__
    return None


def argument_line(err: BaseException) -> str:
    """A jsonargparse error as one line: the key, and for a mistyped class or init argument the
    near matches (difflib) and the valid names."""
    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    keys = re.findall(r'Parser key "([^"]+)"', text)
    key = ".".join(keys) or lines[0].rstrip(":")
    unknown_arg = re.search(
        r"Problem with given class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", text
    )
    unknown_class = re.search(r"(?:Expected a dot import path string:|Import path)\s*'?([\w.]+)'?", text)
    hint = "see --help or --print_config for valid keys and values"
    if unknown_arg:
        return _unknown_arg(key, *unknown_arg.groups(), hint)
    if unknown_class:
        return _unknown_class(key, unknown_class.group(1), hint)
    line = lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')} {lines[-1]}"
    return f"{line} ({hint})"


def _unknown_arg(key: str, class_path: str, name: str, hint: str) -> str:
    import importlib
    import inspect

    module, _, cls_name = class_path.rpartition(".")
    try:
        params = inspect.signature(getattr(importlib.import_module(module), cls_name).__init__).parameters
        valid = [p for p in params if p != "self" and params[p].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                              inspect.Parameter.VAR_KEYWORD)]  # fmt: skip
    except (ImportError, AttributeError, ValueError, TypeError):
        valid = []
    near = difflib.get_close_matches(name, valid, n=3)
    guess = f"; did you mean {' or '.join(near)}?" if near else ""
    return f"{key}: {cls_name} has no argument '{name}'{guess} Valid: {', '.join(valid) or '?'} ({hint})"


def _unknown_class(key: str, name: str, hint: str) -> str:
    names = sorted(_known_classes())
    near = difflib.get_close_matches(name.rpartition(".")[2], names, n=3, cutoff=0.6)
    guess = f"; did you mean {' or '.join(near)}?" if near else "; give a class name or a full import path"
    return f"{key}: unknown class '{name}'{guess} ({hint})"


def _known_classes() -> set[str]:
    """Short names of the classes a config can name: recipes, strategies, sources, callbacks, loggers."""
    import lightning.pytorch as pl

    import strategies
    from mllm_cl.data.sources import Source

    bases = [strategies.Strategy, Source, pl.Callback, pl.loggers.Logger]
    found, todo = set(), list(bases)
    while todo:
        cls = todo.pop()
        found.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return {n for n in found if not n.startswith("_")}


# ---- samples longer than data.max_length ------------------------------------------------------
class LengthCounters:
    """Samples skipped / truncated for length (never silent), owned by the module and checkpointed so
    a resumed run goes on counting: cumulative TensorBoard series ``train/skipped_samples`` and
    ``train/truncated_samples``, and this task's tally for the one-line summary at its end."""

    KEYS = ("skipped", "truncated")

    def __init__(self):
        self.run = dict.fromkeys(self.KEYS, 0)
        self.task = dict.fromkeys(self.KEYS, 0)

    def note(self, module, batch: dict) -> None:
        """Add a training batch's events (the collator's ``skipped``/``truncated`` counts) and log."""
        for key in self.KEYS:
            n = int(batch.get(key, 0))
            if n:
                self.run[key] += n
                self.task[key] += n
                module.log(f"train/{key}_samples", float(self.run[key]))

    def end_task(self, module, task: int) -> None:
        """One line when some of the task's samples were skipped or truncated (summed over ranks;
        every rank must call it); resets the task's tally."""
        local, self.task = self.task, dict.fromkeys(self.KEYS, 0)
        reduce = module.trainer.strategy.reduce
        counts = {
            k: int(reduce(torch.tensor(float(v), device=module.device), reduce_op="sum"))
            for k, v in local.items()
        }
        if any(counts.values()) and module.global_rank_zero():
            name = module.stream.tasks[task].name
            print(
                f"[mllm_cl] task {task} ({name}): {counts['skipped']} samples skipped and "
                f"{counts['truncated']} truncated for data.max_length={module.stream.max_length} "
                "(data.overlength decides)"
            )

    def state_dict(self) -> dict:
        """This rank's counters."""
        return {"run": dict(self.run), "task": dict(self.task)}

    def load_state_dict(self, state: dict | None) -> None:
        for key in ("run", "task"):
            if state and state.get(key):
                setattr(self, key, {k: int(state[key].get(k, 0)) for k in self.KEYS})
