"""Learning without Forgetting (Li & Hoiem 2016), the LwF baseline of Zhu et al. 2025 (LMM_CL).

    L = CE + λ · T² · KL(p_teacher^T ‖ p_student^T),   p^T = softmax(logits / T)

Conventions: the teacher is the model as it was at the start of the current task; the KL is
summed over the vocabulary and averaged over *answer tokens only* (labels ≠ -100, with the causal
shift: the logits at position t predict label t+1); defaults λ = 1, T = 2 as in LMM_CL.

No second model is kept: at task start we copy the *trainable* parameters only (frozen ones are the
same in teacher and student) and run the teacher with those copies swapped in through
`torch.func.functional_call`, under `torch.no_grad`. Extra memory = the trainable parameters' bytes
(see benchmarks/lwf_memory.py). Upstream bugs avoided: the mask is built from the labels the CE uses
(never empty by construction: a batch without answer tokens gives an explicit zero counted in
``train/lwf_empty_batches``), the term keeps its graph (no `.item()`), and errors are not swallowed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from mllm_cl.errors import ConfigError
from strategies.base import Strategy

_NOT_MODEL_INPUTS = ("meta", "skipped", "truncated")


def trainable_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters (under FSDP2 each copy stays a local shard)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rows of `logits` that predict an answer token: position t predicts label t+1."""
    mask = labels[:, 1:] != -100
    return logits[:, :-1][mask]


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · mean over rows of KL(softmax(teacher/T) ‖ softmax(student/T)), in float32."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return temperature**2 * kl.mean()


class LwF(Strategy):
    """Distil the start-of-task model's answer distribution into the model being trained.

    Args:
        lam: weight λ of the distillation term (0 trains exactly like plain fine-tuning).
        temperature: softmax temperature T (the term is scaled by T²).
    """

    def __init__(self, lam: float = 1.0, temperature: float = 2.0):
        if lam < 0 or temperature <= 0:
            raise ConfigError(f"LwF(lam={lam}, temperature={temperature}): need lam >= 0 and temperature > 0")
        self.lam, self.temperature = lam, temperature
        self.teacher: dict[str, torch.Tensor] = {}
        self.empty_batches = 0

    def on_task_start(self, module, task: int) -> None:
        self.teacher = trainable_snapshot(module.model)

    def teacher_logits(self, module, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}
        model, was_training = module.model, module.model.training
        model.eval()  # the teacher is a fixed function: no dropout, no RNG draws
        try:
            with torch.no_grad():
                return functional_call(model, self.teacher, args=(), kwargs=inputs, strict=False).logits
        finally:
            model.train(was_training)

    def loss(self, module, batch: dict, outputs) -> torch.Tensor:
        if not self.teacher:
            raise ConfigError(
                "LwF: no teacher weights; on_task_start did not run (resume from a non-LwF checkpoint?)"
            )
        labels = batch["labels"]
        student = answer_logits(outputs.logits, labels)
        if student.shape[0] == 0:
            # No answer token (all truncated away): an explicit, counted zero, not prompt-token distillation.
            self.empty_batches += 1
            module.log("train/lwf_empty_batches", float(self.empty_batches))
            return outputs.logits.sum() * 0.0
        teacher = answer_logits(self.teacher_logits(module, batch), labels)
        return self.lam * distillation(student, teacher, self.temperature)

    def state_dict(self) -> dict:
        return {"teacher": self.teacher, "empty_batches": self.empty_batches}

    def load_state_dict(self, state: dict) -> None:
        self.teacher = dict(state.get("teacher", {}))
        self.empty_batches = state.get("empty_batches", 0)
