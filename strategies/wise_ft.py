"""WiSE-FT: weight-space ensembling of the start-of-task and fine-tuned weights (Wortsman et al. 2022).

    θ = (1 − α) · θ_start + α · θ_end      elementwise, over the trainable parameters

Convention of mlfoundations/wise-ft: α = 1 keeps the fine-tuned weights, α = 0 restores the start
(LMM_CL writes the same merge as θ = α'·θ_prev + (1−α')·θ_ft, i.e. our α = 1 − α'). Applied after
every task, before the post-task evaluation; the next task starts from the merged weights.

A Lightning callback: its ``on_train_epoch_end`` runs before the module's (lightning 2.6
`fit_loop.on_advance_end` calls non-monitoring callbacks, then the LightningModule, which
evaluates, then ModelCheckpoint), so the accuracy-matrix row and the task checkpoint see the merge.
With an α grid each α is evaluated (`module.evaluate_all()`), logged as ``wise_ft/alpha_<a>/<set>``
(step = task) and the best by `criterion` is kept. Frozen parameters are never touched; under
FSDP2 the stored copies are the local DTensor shards (`p.detach().clone()` keeps the sharding).
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.callbacks import Callback

from mllm_cl.errors import ConfigError


def merge_(
    params: dict[str, torch.Tensor],
    start: dict[str, torch.Tensor],
    end: dict[str, torch.Tensor],
    alpha: float,
):
    """Write (1 − α)·start + α·end into `params` in place."""
    with torch.no_grad():
        for name, p in params.items():
            p.copy_((1 - alpha) * start[name] + alpha * end[name])


class WiSEFT(Callback):
    """Interpolate each task's fine-tuned weights with its start weights.

    Args:
        alpha: weight of the fine-tuned weights (1 = plain fine-tuning, 0 = no change).
        alphas: a grid of α to evaluate after every task; the best by `criterion` is kept.
        criterion: "heldout" (mean accuracy over held-out sets) or "avg" (mean over all eval sets).
    """

    def __init__(self, alpha: float = 0.5, alphas: list[float] | None = None, criterion: str = "heldout"):
        grid = list(alphas) if alphas else [alpha]
        if any(not 0 <= a <= 1 for a in grid):
            raise ConfigError(f"WiSEFT(alpha={alpha}, alphas={alphas}): every alpha must lie in [0, 1]")
        if criterion not in ("heldout", "avg"):
            raise ConfigError(f"WiSEFT(criterion={criterion!r}): use 'heldout' or 'avg'")
        self.alpha, self.alphas, self.criterion = alpha, grid, criterion
        self.start: dict[str, torch.Tensor] = {}
        self.started, self.merged = -1, -1  # last task whose start was stored / whose end was merged
        self.chosen: list[float] = []  # α kept after each task

    @staticmethod
    def trainable(pl_module) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in pl_module.model.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer, pl_module):
        # With LoRA the trainable tensors are the adapters A and B: interpolating both scales the
        # update B·A by about α², not α, so the merge would not be WiSE-FT. Refuse it up front.
        if any(type(s).__name__ == "LoRA" for s in getattr(pl_module, "strategies", [])):
            raise ConfigError(
                "WiSEFT cannot be combined with the LoRA strategy (it would interpolate A and B, not the weights); drop one"
            )

    def on_train_epoch_start(self, trainer, pl_module):
        task = trainer.current_epoch
        if self.started == task:
            return  # resumed inside the task: the start weights come from the checkpoint
        self.start = {n: p.detach().clone() for n, p in self.trainable(pl_module).items()}
        self.started = task

    def on_train_epoch_end(self, trainer, pl_module):
        task = trainer.current_epoch
        if self.merged == task:
            return  # resumed after this task's merge
        params = self.trainable(pl_module)
        end = {n: p.detach().clone() for n, p in params.items()}
        best = self.alphas[0] if len(self.alphas) == 1 else self.search(trainer, pl_module, params, end, task)
        merge_(params, self.start, end, best)
        self.chosen.append(best)
        self.merged = task
        if pl_module.logger is not None:
            pl_module.logger.log_metrics({"wise_ft/alpha": best}, step=task)

    def search(self, trainer, pl_module, params, end, task: int) -> float:
        heldout = [h.name for h in trainer.datamodule.heldout]
        if self.criterion == "heldout" and not heldout:
            raise ConfigError(
                "WiSEFT(criterion='heldout') needs data.heldout sets; add some or use criterion 'avg'"
            )
        best, best_score = self.alphas[0], -math.inf
        for alpha in self.alphas:
            merge_(params, self.start, end, alpha)
            results = {k: r.value for k, r in pl_module.evaluate_all().items()}
            keys = heldout if self.criterion == "heldout" else list(results)
            score = sum(results[k] for k in keys) / len(keys)
            if pl_module.logger is not None:
                pl_module.logger.log_metrics(
                    {f"wise_ft/alpha_{alpha:g}/{k}": v for k, v in results.items()}, step=task
                )
            if score > best_score:  # ties keep the earlier α of the grid
                best, best_score = alpha, score
        return best

    def state_dict(self) -> dict:
        return {"start": self.start, "started": self.started, "merged": self.merged, "chosen": self.chosen}

    def load_state_dict(self, state: dict) -> None:
        self.start = dict(state.get("start", {}))
        self.started, self.merged = state.get("started", -1), state.get("merged", -1)
        self.chosen = list(state.get("chosen", []))
