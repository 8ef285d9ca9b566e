"""Learning without Forgetting (Li & Hoiem 2016), the LwF baseline of Zhu et al. 2025 (LMM_CL).

    L = CE + λ · T² · KL(p_teacher^T ‖ p_student^T),   p^T = softmax(logits / T)

Conventions: the teacher is the model as it was at the start of the current task; the KL is
summed over the vocabulary and averaged over *answer tokens only* (labels ≠ -100, with the causal
shift: the logits at position t predict label t+1); defaults λ = 1, T = 2 as in LMM_CL.

No second model is kept: at task start we copy the *trainable* parameters only (frozen ones are the
same in teacher and student). The teacher pass exchanges those copies with the live values in place,
runs the model under `torch.no_grad` and exchanges them back, bit for bit, before the backward needs
the student's weights. The teacher pass runs under a nested ``torch.autocast(..., cache_enabled=False)``
(`uncached_autocast`): autocast caches the low-precision copy of each leaf weight by tensor identity,
and an in-place exchange keeps that identity, so with the cache on (``torch.autocast``'s default, and
the FSDP1 precision plugin's) the teacher pass would reuse the student's cached casts and the term
would be exactly 0 (measured on the tiny LLaVA, SA Proj: 0.0213 in fp32, 0.0 under bf16 autocast).
In place because FSDP2 gathers each layer from its own shard storage in its
pre-forward hook: swapping module attributes (`torch.func.functional_call`) is silently undone there
and the teacher becomes the student (KL 0; tests/test_multiprocess.py). Extra memory = the trainable
parameters' bytes, plus one parameter during the exchange (see benchmarks/lwf_memory.py). Upstream bugs avoided: the mask is built from the labels the CE uses
(never empty by construction: a batch without answer tokens gives an explicit zero counted in
``train/lwf_empty_batches``), the term keeps its graph (no `.item()`), and errors are not swallowed.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from mllm_cl.data.collate import BOOKKEEPING_KEYS
from mllm_cl.errors import ConfigError
from strategies.base import MemoryTerm, Strategy, trainable_snapshot


@torch.no_grad()
def exchange(params: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """Swap the values of `params[name]` and `saved[name]` in place (DTensor shards: local values).

    Through `.data`, so autograd's version counters do not move: the forward already run saved these
    weights for its backward, and they hold the same values again once the exchange is undone.
    """
    for name, value in saved.items():
        live = params[name].data
        held = live.clone()
        live.copy_(value)
        value.copy_(held)


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


@contextlib.contextmanager
def uncached_autocast():
    """Re-enter every active autocast with its weight cache off (a no-op where none is active).

    Autocast keys its cache on the weight tensor; a nested region with ``cache_enabled=False`` neither
    reads nor writes it, so casts inside see the values the weights hold now.
    """
    with contextlib.ExitStack() as stack:
        for device in _AUTOCAST_DEVICES:
            if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
                dtype = torch.get_autocast_dtype(device)
                stack.enter_context(torch.autocast(device, dtype=dtype, cache_enabled=False))
        yield


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

    def on_task_start(self, ctx, task: int) -> None:
        self.teacher = trainable_snapshot(ctx.model)

    def teacher_logits(self, ctx, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in BOOKKEEPING_KEYS}
        model, was_training = ctx.model, ctx.model.training
        params = dict(model.named_parameters())
        model.eval()  # the teacher is a fixed function: no dropout, no RNG draws
        exchange(params, self.teacher)
        try:
            with torch.no_grad(), uncached_autocast():
                return model(**inputs).logits
        finally:
            exchange(params, self.teacher)
            model.train(was_training)

    def loss(self, ctx, batch: dict, outputs) -> torch.Tensor:
        if not self.teacher:
            raise ConfigError(
                "LwF: no teacher weights; on_task_start did not run (resume from a non-LwF checkpoint?)"
            )
        labels = batch["labels"]
        student = answer_logits(outputs.logits, labels)
        if student.shape[0] == 0:
            # No answer token (all truncated away): an explicit, counted zero, not prompt-token distillation.
            self.empty_batches += 1
            ctx.log("train/lwf_empty_batches", float(self.empty_batches))
            return outputs.logits.sum() * 0.0
        teacher = answer_logits(self.teacher_logits(ctx, batch), labels)
        return self.lam * distillation(student, teacher, self.temperature)

    def memory(self, plan) -> list[MemoryTerm]:
        teacher = plan.micro_batch * plan.seq_len * plan.vocab * plan.compute_bytes
        return [
            MemoryTerm(
                "LwF teacher snapshot",
                plan.sharded(plan.trainable * plan.weight_bytes),
                "a copy of the trainable weights, taken at each task start",
            ),
            MemoryTerm(
                "LwF teacher logits",
                teacher,
                "b x s x V of the no-grad teacher pass; the fp32 KL runs on answer tokens only",
            ),
        ]

    def state_dict(self) -> dict:
        return {"teacher": self.teacher, "empty_batches": self.empty_batches}

    def load_state_dict(self, state: dict) -> None:
        self.teacher = dict(state.get("teacher", {}))
        self.empty_batches = state.get("empty_batches", 0)
