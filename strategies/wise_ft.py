"""WiSE-FT: weight-space ensembling of a reference and the fine-tuned weights (Wortsman et al. 2022).

    θ = (1 − α) · θ_ref + α · θ_end      elementwise, over the trainable parameters

Convention of mlfoundations/wise-ft: α = 1 keeps the fine-tuned weights, α = 0 restores θ_ref. The
reference is the start of the task (``reference: task_start``, as LMM_CL) or the weights before the
first task (``reference: base``, Wortsman et al.'s zero-shot θ₀). Applied after every task, before its
accuracy-matrix row is scored; the next task starts from the merged weights. **LMM_CL** (Zhu et al.
2025) merges θ = 0.1·θ_prev + 0.9·θ_ft after each stage (their script; the README says 0.5): that is
``alpha: 0.9, reference: task_start`` here.

Choosing α (`alphas`: a grid, tried in order, best mean accuracy on the selection sets kept, ties
keep the earlier α) follows `mllm_cl.selection`: the selection sets are `select_on` (default: every
`validation` set); a `validation` set is scored only for this choice and never enters the accuracy
matrix; naming a set the matrix reports (or the legacy `criterion` without `select_on`) is refused
unless ``allow_select_on_reported: true``.

Records, the accuracy matrix keeping its meaning (rows score the merged model): the pre-merge model
(θ_end) is scored on every eval set of the stream and written with the chosen α and each α's scores
to ``wise_ft.json`` in the run directory; TensorBoard gets ``wise_ft/alpha`` and
``wise_ft/alpha_<a>/<set>`` (step = task) and ``wise_ft/pre_merge/<set>`` (step = matrix row).

Use it under ``model.strategies`` (its `before_evaluation` hook runs right before the row is scored).
It still works under ``trainer.callbacks`` (older configs): its ``on_train_epoch_end`` runs before the
module's. LoRA is refused (interpolating A and B scales B·A by about α², not α).
"""

from __future__ import annotations

import json
import math

import torch
from lightning.pytorch.callbacks import Callback

from mllm_cl.data.stream import EvalSet
from mllm_cl.errors import ConfigError
from mllm_cl.selection import Selection
from strategies.base import Strategy, trainable_snapshot


def merge_(
    params: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha
):
    """Write (1 − α)·ref + α·end into `params` in place."""
    with torch.no_grad():
        for name, p in params.items():
            p.copy_((1 - alpha) * ref[name] + alpha * end[name])


class WiSEFT(Strategy, Callback):
    """Interpolate each task's fine-tuned weights with a reference (see the module docstring).

    Args:
        alpha: weight of the fine-tuned weights (1 = plain fine-tuning, 0 = the reference);
            LMM_CL's merge is alpha 0.9 with reference task_start.
        alphas: a grid of α tried after every task; the best on the selection sets is kept.
        criterion: without `select_on`/`validation`: choose on the stream's "heldout" sets or on all
            eval sets ("avg"). Both are reported sets (needs allow_select_on_reported).
        select_on: names of the sets whose mean accuracy chooses α (default: every `validation` set).
        validation: eval sets scored only to choose α, never reported in the accuracy matrix.
        allow_select_on_reported: allow choosing α on sets the accuracy matrix reports.
        reference: "task_start" (θ at the task's start) or "base" (θ before the first task).
        record_pre_merge: score the pre-merge model on every eval set (wise_ft.json).
    """

    def __init__(
        self,
        alpha: float = 0.5,
        alphas: list[float] | None = None,
        criterion: str = "heldout",
        select_on: list[str] | None = None,
        validation: list[EvalSet] | None = None,
        allow_select_on_reported: bool = False,
        reference: str = "task_start",
        record_pre_merge: bool = True,
    ):
        grid = list(alphas) if alphas else [alpha]
        if any(not 0 <= a <= 1 for a in grid):
            raise ConfigError(f"WiSEFT(alpha={alpha}, alphas={alphas}): every alpha must lie in [0, 1]")
        if reference not in ("task_start", "base"):
            raise ConfigError(f"WiSEFT(reference={reference!r}): use 'task_start' or 'base'")
        self.alpha, self.alphas, self.reference = alpha, grid, reference
        self.selection = Selection("WiSEFT", validation or [], select_on, criterion, allow_select_on_reported)
        self.record_pre_merge = record_pre_merge
        self.ref: dict[str, torch.Tensor] = {}  # θ_ref of the current task
        self.started, self.merged = -1, -1  # last task whose start was stored / whose end was merged
        self.records: list[dict] = []  # per task: α scores and the pre-merge evaluation

    # ---- Strategy hooks -----------------------------------------------------------------------
    def setup(self, ctx, pl_module=None, stage=None) -> None:
        """`Strategy.setup(ctx)`, or `Callback.setup(trainer, pl_module, stage)` on the callback path."""
        strategies = (ctx if pl_module is None else pl_module.context).strategies
        if any(s.reparametrizes_weights for s in strategies):
            raise ConfigError(
                "WiSEFT cannot be combined with the LoRA strategy (it would interpolate A and B, not the weights); drop one"
            )

    def on_task_start(self, ctx, task: int) -> None:
        self.keys(ctx)  # refuse a bad selection before the first step
        if self.reference == "task_start" or not self.ref:
            self.ref = trainable_snapshot(ctx.model)
        self.started = task

    def before_evaluation(self, ctx, task: int) -> None:
        if self.merged == task:
            return  # resumed after this task's merge
        params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
        end = trainable_snapshot(ctx.model)
        record: dict = {"task": task}
        if self.record_pre_merge:
            record["pre_merge"] = {k: r.value for k, r in ctx.evaluate().items()}
        best = self.alphas[0]
        if len(self.alphas) > 1:
            best, record["scores"] = self.search(ctx, params, end, task, record.get("pre_merge"))
        merge_(params, self.ref, end, best)
        record["alpha"] = best
        self.records.append(record)
        self.merged = task
        self.publish(ctx, record)

    @property
    def chosen(self) -> list[float]:
        """The α kept after each task so far."""
        return [record["alpha"] for record in self.records]

    # ---- choosing α ---------------------------------------------------------------------------
    def keys(self, ctx) -> list[str]:
        return self.selection.keys(ctx.data) if len(self.alphas) > 1 else []

    def search(self, ctx, params, end, task: int, pre_merge: dict | None) -> tuple[float, dict]:
        keys = self.keys(ctx)
        best, best_score, scores = self.alphas[0], -math.inf, {}
        for alpha in self.alphas:
            merge_(params, self.ref, end, alpha)
            results = self.selection.scores(ctx, keys, pre_merge if alpha == 1 else None)
            score = self.selection.mean(results, keys)
            scores[f"{alpha:g}"] = {"score": score, **results}
            ctx.log_metrics({f"wise_ft/alpha_{alpha:g}/{k}": v for k, v in results.items()}, step=task)
            if score > best_score:  # ties keep the earlier α of the grid
                best, best_score = alpha, score
        return best, scores

    # ---- records ------------------------------------------------------------------------------
    def publish(self, ctx, record: dict) -> None:
        ctx.log_metrics({"wise_ft/alpha": record["alpha"]}, step=record["task"])
        if pre := {f"wise_ft/pre_merge/{k}": v for k, v in record.get("pre_merge", {}).items()}:
            ctx.log_metrics(pre, step=record["task"] + 1)
        summary = {
            "convention": "theta = (1 - alpha) * theta_ref + alpha * theta_end",
            "reference": self.reference,
            "alphas": self.alphas,
            "select_on": self.keys(ctx),
            "tasks": self.records,
        }
        ctx.write_record("wise_ft.json", json.dumps(summary, indent=2))

    # ---- the callback path (WiSEFT under trainer.callbacks) ----------------------------------
    def on_train_epoch_start(self, trainer, pl_module):
        if self.started != trainer.current_epoch:  # resumed inside the task: θ_ref comes from the checkpoint
            self.on_task_start(pl_module.context, trainer.current_epoch)

    def on_train_epoch_end(self, trainer, pl_module):
        self.before_evaluation(pl_module.context, trainer.current_epoch)

    # ---- state (both paths) -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "ref": self.ref,
            "started": self.started,
            "merged": self.merged,
            "records": json.dumps(self.records),
        }

    def load_state_dict(self, state: dict) -> None:
        self.ref = dict(state.get("ref", state.get("start", {})))
        self.started, self.merged = state.get("started", -1), state.get("merged", -1)
        self.records = json.loads(state.get("records", "[]"))
