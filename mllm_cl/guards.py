"""Run-time guards: non-finite losses, and errors reduced to the one line a user needs.

`nonfinite_loss` (an `MLLMModule` argument) decides what a NaN / inf loss does:
"stop" raises `NonFiniteLossError` naming the task and step (the default: a diverged run should
not keep writing checkpoints), "skip" drops the batch (``training_step`` returns None, so
Lightning does no backward and AdamW skips every parameter) and counts it in
``train/nonfinite_skipped``.
"""

from __future__ import annotations

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


def argument_line(err: BaseException) -> str:
    """A jsonargparse error (key on the first line, offending value on the last) as one line."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    text = lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')} {lines[-1]}"
    return f"{text} (see --help or --print_config for valid keys and values)"


# ---- samples longer than data.max_length ------------------------------------------------------
def note_length_events(module, batch: dict) -> None:
    """Count samples skipped / truncated for length (never silent): cumulative TensorBoard counters
    ``train/skipped_samples`` and ``train/truncated_samples``, plus this task's tally."""
    counts = module.__dict__.setdefault("_length_counts", {"skipped": 0, "truncated": 0})
    task = module.__dict__.setdefault("_task_length_counts", {"skipped": 0, "truncated": 0})
    for key in counts:
        n = int(batch.get(key, 0))
        if n:
            counts[key] += n
            task[key] += n
            module.log(f"train/{key}_samples", float(counts[key]))


def length_counts(module) -> dict:
    """This rank's counters, for the checkpoint (a resumed run goes on counting, not from zero)."""
    return {"run": module.__dict__.get("_length_counts"), "task": module.__dict__.get("_task_length_counts")}


def restore_length_counts(module, state: dict | None) -> None:
    for key, attr in (("run", "_length_counts"), ("task", "_task_length_counts")):
        if state and state.get(key):
            module.__dict__[attr] = dict(state[key])


def print_length_summary(module, task: int) -> None:
    """One line per task when some samples were skipped or truncated (summed over ranks; every rank
    must call it); resets the task's tally."""
    local = module.__dict__.pop("_task_length_counts", None) or {"skipped": 0, "truncated": 0}
    strategy = module.trainer.strategy
    counts = {
        k: int(strategy.reduce(torch.tensor(float(v), device=module.device), reduce_op="sum"))
        for k, v in local.items()
    }
    if any(counts.values()) and module.global_rank_zero():
        name = module.stream.tasks[task].name
        limit = module.stream.max_length
        print(
            f"[mllm_cl] task {task} ({name}): {counts['skipped']} samples skipped and "
            f"{counts['truncated']} truncated for data.max_length={limit} (data.overlength decides)"
        )
