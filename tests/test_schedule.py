"""Per-task optimisation in a real fit: the warmup + cosine LR of each task, a fresh AdamW state at
every task start, and `epochs`-based step counts under gradient accumulation.

Every expected number is worked out by hand below from the schedule's definition (mllm_cl/optim.py):
with W = ceil(warmup_ratio · S) warmup steps of a task of S optimizer steps, step k (0-based) runs at

    lr · (k + 1) / W                                              for k < W
    lr · (m + (1 − m) · ½ · (1 + cos(π · (k − W) / (S − W))))     after,   m = min_lr_ratio.
"""

from __future__ import annotations

import math

import lightning as L
import pytest

from mllm_cl.data import Synthetic, Task, TaskStream
from mllm_cl.module import MLLMModule
from strategies.freeze import SAProj
from tests.helpers import quiet_trainer

LR = 1e-3
R2, R3 = math.sqrt(2) / 2, math.sqrt(3) / 2  # cos(π/4), cos(π/6)
# Task "a": steps 8, warmup ceil(0.25 · 8) = 2, cosine over 6 steps from 1 down towards m = 0.1.
WANT_A = [
    0.5,
    1.0,
    1.0,
    0.1 + 0.45 * (1 + R3),
    0.1 + 0.45 * 1.5,
    0.55,
    0.1 + 0.45 * 0.5,
    0.1 + 0.45 * (1 - R3),
]
# Task "b": epochs 1.5 of 16 samples = 24 samples; batch 2 x accumulation 2 = 4 per step -> 6 steps;
# warmup ceil(0.25 · 6) = 2, cosine over 4 steps.
WANT_B = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + R2), 0.55, 0.1 + 0.45 * (1 - R2)]


class OptimizerLog(L.Callback):
    """Per micro-batch, before it runs: (task, batch index, LR of the step, tensors held by AdamW)."""

    def __init__(self):
        self.rows: list[tuple[int, int, float, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        lr = optimizer.param_groups[0]["lr"]
        self.rows.append((trainer.current_epoch, batch_idx, lr, len(optimizer.state)))


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    L.seed_everything(0)
    module = MLLMModule(family="llava", recipe=SAProj(), lr=LR, warmup_ratio=0.25, min_lr_ratio=0.1)
    stream = TaskStream(
        tasks=[
            Task("a", train=Synthetic("count", n=16, seed=1, image_size=32), steps=8, epochs=5.0),
            Task("b", train=Synthetic("colour", n=16, seed=2, image_size=32), epochs=1.5),
        ],
        batch_size=2,
    )
    log = OptimizerLog()
    trainer = quiet_trainer(tmp_path_factory.mktemp("sched"), accumulate_grad_batches=2, callbacks=[log])
    trainer.fit(module, datamodule=stream)
    return trainer, log.rows


def test_steps_from_epochs_count_accumulated_micro_batches(two_tasks):
    trainer, rows = two_tasks
    micro = [sum(1 for r in rows if r[0] == task) for task in (0, 1)]
    assert micro == [16, 12]  # a: 8 steps x 2 (its `steps` wins over `epochs`); b: 6 steps x 2
    assert trainer.global_step == 8 + 6


def test_lr_follows_warmup_then_cosine_restarted_per_task(two_tasks):
    _, rows = two_tasks
    for task, want in ((0, WANT_A), (1, WANT_B)):
        # The LR of optimizer step k, read before its first micro-batch (k = batch index // 2).
        got = [lr / LR for t, i, lr, _ in rows if t == task and i % 2 == 0]
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (task, got)
    # Spot values, by hand: the first step of each task is half the peak; b's third cosine step is 0.55.
    assert rows[0][2] == pytest.approx(5e-4) and [r[2] for r in rows if r[:2] == (1, 8)] == pytest.approx(
        [5.5e-4]
    )


def test_adam_state_is_empty_at_every_task_start(two_tasks):
    trainer, rows = two_tasks
    for task in (0, 1):
        held = [n for t, i, _, n in rows if t == task]
        assert held[:2] == [0, 0]  # both micro-batches of the task's first step see a fresh AdamW
        assert all(n > 0 for n in held[2:])  # ... and the log does see a filled state later on
    # The moments of the end of the run were built by task b's 6 steps only, not 8 + 6.
    steps = {float(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert steps == {6.0}
