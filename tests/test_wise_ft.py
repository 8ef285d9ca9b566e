"""WiSE-FT callback (strategies/wise_ft.py): exact merges before evaluation, α grid, checkpoint state."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mllm_cl.data import Synthetic, Task, TaskStream
from mllm_cl.errors import ConfigError
from mllm_cl.module import MLLMModule
from strategies.freeze import SAProj
from strategies.wise_ft import WiSEFT
from tests.helpers import SeenByEval, WeightSnapshots, quiet_trainer


def fit(callback: WiSEFT, tmp_path):
    L.seed_everything(0)
    probe = SeenByEval()
    module = MLLMModule(
        family="llava", recipe=SAProj(), strategies=[probe], lr=1e-2, warmup_ratio=0.0, max_new_tokens=3
    )

    def src(skill, seed, n=16):
        return Synthetic(skill, n=n, seed=seed, image_size=32, object_size=(0.5, 0.9))

    stream = TaskStream(
        tasks=[
            Task("colour", train=src("colour", 1), eval=src("colour", 1, 8), steps=4),
            Task("shape", train=src("shape", 3), eval=src("shape", 3, 8), steps=4),
        ],
        batch_size=4,
        eval_batch_size=8,
    )
    snap = WeightSnapshots()  # listed before WiSEFT: its end weights are the ones before the merge
    trainer = quiet_trainer(
        tmp_path, callbacks=[snap, callback], logger=TensorBoardLogger(str(tmp_path), name="tb")
    )
    trainer.fit(module, datamodule=stream)
    return module, trainer, snap, probe


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_merge_is_exact_before_evaluation_and_carries_over(alpha, tmp_path):
    module, trainer, snap, probe = fit(WiSEFT(alpha=alpha), tmp_path)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    for task in range(2):
        start, end, seen = snap.start[task], snap.end[task], probe.seen[task]
        assert any(not torch.equal(start[n], end[n]) for n in trainable)  # the task did train
        for n in start:
            want = (1 - alpha) * start[n] + alpha * end[n] if n in trainable else start[n]
            assert torch.equal(seen[n], want), (task, n)  # frozen ones untouched, bit for bit
        if alpha == 0.0:
            assert all(torch.equal(seen[n], start[n]) for n in start)
        if alpha == 1.0:
            assert all(torch.equal(seen[n], end[n]) for n in start)
    # The next task starts from the merged weights.
    assert all(torch.equal(snap.start[1][n], probe.seen[0][n]) for n in trainable)


def test_alpha_grid_keeps_the_best_and_logs_every_alpha(tmp_path):
    wise = WiSEFT(alphas=[0.0, 0.5, 1.0], criterion="avg")
    module, trainer, snap, probe = fit(wise, tmp_path)
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    names = ["colour", "shape"]
    for task in range(2):
        scores = {}
        for a in (0.0, 0.5, 1.0):
            values = [
                s.value
                for name in names
                for s in events.Scalars(f"wise_ft/alpha_{a:g}/{name}")
                if s.step == task
            ]
            assert len(values) == 2
            scores[a] = sum(values) / 2
        best = max(scores, key=lambda a: (scores[a], -a))  # ties keep the earlier α of the grid
        assert wise.chosen[task] == best
        start, end = snap.start[task], snap.end[task]
        n = next(n for n, p in module.model.named_parameters() if p.requires_grad)
        assert torch.equal(probe.seen[task][n], (1 - best) * start[n] + best * end[n])
        # The recorded accuracy-matrix row is the evaluation of the kept α.
        assert sum(module.results.rows[task + 1]) / 2 == pytest.approx(scores[best], abs=1e-6)


def test_state_round_trip_and_bad_input(tmp_path):
    wise = WiSEFT(alpha=0.5)
    _, trainer, _, _ = fit(wise, tmp_path)
    path = tmp_path / "w.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)["callbacks"][wise.state_key]
    fresh = WiSEFT(alpha=0.5)
    fresh.load_state_dict(state)
    assert fresh.start.keys() == wise.start.keys() and all(
        torch.equal(fresh.start[n], wise.start[n]) for n in wise.start
    )
    assert (fresh.started, fresh.merged) == (1, 1)
    with pytest.raises(ConfigError, match="alphas"):
        WiSEFT(alphas=[0.5, 1.5])
    with pytest.raises(ConfigError, match="heldout"):
        fit(
            WiSEFT(alphas=[0.0, 1.0], criterion="heldout"), tmp_path / "no_heldout"
        )  # stream has no held-out sets


def test_wise_ft_refuses_lora(tmp_path):
    """WiSE-FT over LoRA adapters would scale B·A by ~α², so the combination stops with one line."""
    from strategies import LoRA

    data = Synthetic("colour", n=4, seed=1, image_size=32)
    stream = TaskStream(tasks=[Task("t", train=data, eval=data, steps=1)], batch_size=2)
    module = MLLMModule(tiny="tiny", recipe=SAProj(), strategies=[LoRA(r=2, alpha=4)])
    trainer = quiet_trainer(tmp_path, callbacks=[WiSEFT(alpha=0.5)])
    with pytest.raises(ConfigError, match="WiSEFT cannot be combined with the LoRA"):
        trainer.fit(module, datamodule=stream)
