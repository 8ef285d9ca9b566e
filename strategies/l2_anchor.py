"""L2 anchor: pull the trained parameters toward their start-of-task values.

    L = CE + λ/2 · Σ_i ‖θ_i − θ_i^start‖²   over the trainable parameters θ_i

The isotropic special case of EWC (Kirkpatrick et al. 2017, all Fisher weights = 1), also called
L2-SP when anchored to the pre-trained weights (Li et al. 2018). θ^start is taken at every task
start, so the anchor moves with the stream. Written only against the public `Strategy` hooks, as
the worked example of "Writing a new strategy" in the README.
"""

from __future__ import annotations

import torch

from mllm_cl.errors import ConfigError
from strategies.base import MemoryTerm, Strategy, trainable_snapshot


class L2Anchor(Strategy):
    """Quadratic penalty λ/2·Σ‖θ−θ_start‖² toward the weights at the start of each task.

    Args:
        lam: penalty weight λ (0 disables the pull).
    """

    def __init__(self, lam: float = 1.0):
        if lam < 0:
            raise ConfigError(f"L2Anchor(lam={lam}): lam must be >= 0")
        self.lam = lam
        self.anchor: dict[str, torch.Tensor] = {}

    def on_task_start(self, ctx, task: int) -> None:
        self.anchor = trainable_snapshot(ctx.model)  # only trainable parameters can move

    def loss(self, ctx, batch: dict, outputs) -> torch.Tensor:
        params = dict(ctx.model.named_parameters())
        total = sum(((params[n] - a) ** 2).sum() for n, a in self.anchor.items())
        return 0.5 * self.lam * total

    def memory(self, plan) -> list[MemoryTerm]:
        copy = plan.sharded(plan.trainable * plan.weight_bytes)
        return [
            MemoryTerm("L2 anchor", copy, "a copy of the trainable weights, taken at each task start"),
            # pow's backward keeps its input: every parameter's θ − θ_start lives until the backward.
            MemoryTerm(
                "L2 anchor differences", copy, "θ − θ_start of every trainable weight, kept for backward"
            ),
        ]

    def state_dict(self) -> dict:
        return {"anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        self.anchor = dict(state.get("anchor", {}))
