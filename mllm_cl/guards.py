"""Run-time guards of training: non-finite losses, and samples skipped or truncated for length.

`nonfinite_loss` (an `MLLMModule` argument) decides what a NaN / inf loss does:
"stop" raises `NonFiniteLossError` naming the task and step (the default: a diverged run should
not keep writing checkpoints), "skip" drops the batch (``training_step`` returns None, so
Lightning does no backward and AdamW skips every parameter) and counts it in
``train/nonfinite_skipped``.
"""

from __future__ import annotations

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
    module.counters.note_nonfinite(module)
    return None


# ---- samples longer than data.max_length ------------------------------------------------------
class TrainingCounters:
    """What training skipped or cut, never silently: samples skipped / truncated for length and
    batches skipped for a non-finite loss. Owned by the module and checkpointed, so a resumed run goes
    on counting: cumulative TensorBoard series ``train/skipped_samples``, ``train/truncated_samples``
    and ``train/nonfinite_skipped``, and each task's length tally for a one-line summary at its end."""

    KEYS = ("skipped", "truncated")

    def __init__(self):
        self.run = dict.fromkeys(self.KEYS, 0)
        self.task = dict.fromkeys(self.KEYS, 0)
        self.nonfinite = 0  # batches skipped for a NaN / inf loss (nonfinite_loss: skip)

    def note(self, module, batch: dict) -> None:
        """Add a training batch's events (the collator's ``skipped``/``truncated`` counts) and log."""
        for key in self.KEYS:
            n = int(batch.get(key, 0))
            if n:
                self.run[key] += n
                self.task[key] += n
                module.log(f"train/{key}_samples", float(self.run[key]))

    def note_nonfinite(self, module) -> None:
        self.nonfinite += 1
        module.log("train/nonfinite_skipped", float(self.nonfinite))

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
        return {"run": dict(self.run), "task": dict(self.task), "nonfinite": self.nonfinite}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        for key in ("run", "task"):
            if state.get(key):
                setattr(self, key, {k: int(state[key].get(k, 0)) for k in self.KEYS})
        self.nonfinite = int(state.get("nonfinite", 0))
