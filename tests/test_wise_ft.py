"""WiSE-FT (strategies/wise_ft.py) as a strategy and as a callback: exact merges before evaluation, α
grid, α chosen on validation sets only, the base reference, the pre-merge record, checkpoint state."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mllm_cl.data import EvalSet, Synthetic, Task, TaskStream
from mllm_cl.errors import ConfigError
from mllm_cl.module import MLLMModule
from strategies.base import Strategy
from strategies.freeze import SAProj
from strategies.wise_ft import WiSEFT


def weights(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


class Snap(L.Callback):
    """Weights at each task's start and at its end (listed before WiSEFT, so before the merge)."""

    def __init__(self):
        self.start, self.end = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.start.append(weights(pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        self.end.append(weights(pl_module))


class SeenByEval(Strategy):
    """A probe strategy listed after WiSEFT: the weights (and their scores) at the end of each task, and
    the weights its row scores (`before_evaluation` runs right before the row's evaluation)."""

    def __init__(self, score_end: bool = False):
        self.seen, self.end_scores, self.score_end = [], [], score_end

    def on_task_end(self, ctx, task):
        if self.score_end:  # the fine-tuned model, scored here independently of WiSE-FT's record
            self.end_scores.append({k: r.value for k, r in ctx.evaluate().items()})

    def before_evaluation(self, ctx, task):
        self.seen.append(weights(ctx))


def src(skill, seed, n=16):
    return Synthetic(skill, n=n, seed=seed, image_size=32, object_size=(0.5, 0.9))


def fit(callback: WiSEFT | None, tmp_path, strategies=(), heldout=None, score_end=False):
    L.seed_everything(0)
    probe = SeenByEval(score_end)
    module = MLLMModule(
        family="llava",
        recipe=SAProj(),
        strategies=[*strategies, probe],
        lr=1e-2,
        warmup_ratio=0.0,
        max_new_tokens=3,
    )
    stream = TaskStream(
        tasks=[
            Task("colour", train=src("colour", 1), eval=src("colour", 1, 8), steps=4),
            Task("shape", train=src("shape", 3), eval=src("shape", 3, 8), steps=4),
        ],
        heldout=heldout,
        batch_size=4,
        eval_batch_size=8,
    )
    snap = Snap()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[snap] + ([callback] if callback is not None else []),
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
    )
    trainer.fit(module, datamodule=stream)
    return module, trainer, snap, probe


@pytest.mark.parametrize("path", ["strategy", "callback"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_merge_is_exact_before_evaluation_and_carries_over(alpha, path, tmp_path):
    if path == "strategy":  # under model.strategies: the before_evaluation hook
        module, trainer, snap, probe = fit(None, tmp_path, strategies=[WiSEFT(alpha=alpha)])
    else:  # under trainer.callbacks (older configs)
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
    wise = WiSEFT(alphas=[0.0, 0.5, 1.0], criterion="avg", allow_select_on_reported=True)
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
    assert fresh.ref.keys() == wise.ref.keys() and all(
        torch.equal(fresh.ref[n], wise.ref[n]) for n in wise.ref
    )
    assert fresh.records == wise.records and len(wise.records) == 2
    assert (fresh.started, fresh.merged) == (1, 1)
    with pytest.raises(ConfigError, match="alphas"):
        WiSEFT(alphas=[0.5, 1.5])
    with pytest.raises(ConfigError, match="heldout"):
        fit(
            WiSEFT(alphas=[0.0, 1.0], criterion="heldout"), tmp_path / "no_heldout"
        )  # stream has no held-out sets


def test_wise_ft_refuses_lora(tmp_path):
    """WiSE-FT over LoRA adapters would scale B·A by ~α², so the combination stops with one line."""
    import lightning as L

    from mllm_cl.data import Synthetic, Task, TaskStream
    from mllm_cl.errors import ConfigError
    from mllm_cl.module import MLLMModule
    from strategies import LoRA, SAProj, WiSEFT

    data = Synthetic("colour", n=4, seed=1, image_size=32)
    stream = TaskStream(tasks=[Task("t", train=data, eval=data, steps=1)], batch_size=2)
    module = MLLMModule(tiny="tiny", recipe=SAProj(), strategies=[LoRA(r=2, alpha=4)])
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        callbacks=[WiSEFT(alpha=0.5)],
    )
    with pytest.raises(ConfigError, match="WiSEFT cannot be combined with the LoRA"):
        trainer.fit(module, datamodule=stream)


def scalars(trainer, tag: str) -> dict[int, float]:
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    return {s.step: s.value for s in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {}


def test_alpha_chosen_on_validation_sets_only_and_the_pre_merge_record(tmp_path):
    """select_on names validation sets: α is the best mean over them, the matrix never holds them, the
    reported sets are not scored per α, and wise_ft.json holds each task's pre-merge evaluation."""
    validation = [EvalSet("colour_val", src("colour", 7, 8)), EvalSet("shape_val", src("shape", 8, 8))]
    heldout = [EvalSet("shape_heldout", src("shape", 9, 8))]
    wise = WiSEFT(alphas=[0.0, 0.5, 1.0], validation=validation, select_on=["colour_val", "shape_val"])
    module, trainer, snap, probe = fit(None, tmp_path, [wise], heldout=heldout, score_end=True)
    assert module.results.columns == ["colour", "shape", "shape_heldout"]  # no validation column
    for task in range(2):
        scores = {
            a: (scalars(trainer, f"wise_ft/alpha_{a:g}/colour_val")[task] + scalars(trainer, f"wise_ft/alpha_{a:g}/shape_val")[task]) / 2
            for a in (0.0, 0.5, 1.0)
        }  # fmt: skip
        best = max(scores, key=lambda a: (scores[a], -a))  # ties keep the earlier α
        assert wise.chosen[task] == best
        start, end = snap.start[task], snap.end[task]
        for n in (n for n, p in module.model.named_parameters() if p.requires_grad):
            assert torch.equal(probe.seen[task][n], (1 - best) * start[n] + best * end[n])
    for name in ("colour", "shape", "shape_heldout"):  # reported sets: never scored to choose α
        assert not scalars(trainer, f"wise_ft/alpha_0.5/{name}")
    record = json.loads((tmp_path / "tb" / "version_0" / "wise_ft.json").read_text())
    assert record["select_on"] == ["colour_val", "shape_val"] and record["reference"] == "task_start"
    assert [t["alpha"] for t in record["tasks"]] == wise.chosen
    for task, entry in enumerate(record["tasks"]):
        assert entry["pre_merge"] == pytest.approx(probe.end_scores[task], abs=1e-6)  # θ_end, scored apart
        assert scalars(trainer, "wise_ft/pre_merge/shape_heldout")[task + 1] == pytest.approx(
            entry["pre_merge"]["shape_heldout"], abs=1e-6
        )
        for s in entry["scores"].values():
            assert s["score"] == pytest.approx((s["colour_val"] + s["shape_val"]) / 2)


def test_selecting_on_reported_sets_is_refused_unless_allowed(tmp_path):
    heldout = [EvalSet("shape_heldout", src("shape", 9, 8))]
    with pytest.raises(ConfigError, match=r"shape_heldout.*allow_select_on_reported") as err:
        fit(None, tmp_path / "a", [WiSEFT(alphas=[0.0, 1.0], select_on=["shape_heldout"])], heldout=heldout)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="allow_select_on_reported"):  # the legacy criterion alike
        fit(WiSEFT(alphas=[0.0, 1.0], criterion="heldout"), tmp_path / "b", heldout=heldout)
    with pytest.raises(ConfigError, match="nope"):
        fit(None, tmp_path / "c", [WiSEFT(alphas=[0.0, 1.0], select_on=["nope"])], heldout=heldout)
    allowed = WiSEFT(alphas=[0.0, 1.0], select_on=["shape_heldout"], allow_select_on_reported=True)
    module, trainer, _, _ = fit(None, tmp_path / "d", [allowed], heldout=heldout)
    for task in range(2):
        scores = {a: scalars(trainer, f"wise_ft/alpha_{a:g}/shape_heldout")[task] for a in (0.0, 1.0)}
        assert allowed.chosen[task] == max(scores, key=lambda a: (scores[a], -a))
        assert module.results.rows[task + 1][2] == pytest.approx(scores[allowed.chosen[task]], abs=1e-6)


def test_reference_base_interpolates_towards_the_weights_before_the_first_task(tmp_path):
    module, trainer, snap, probe = fit(None, tmp_path, [WiSEFT(alpha=0.5, reference="base")])
    theta0 = snap.start[0]
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    for task in range(2):
        end = snap.end[task]
        for n in trainable:
            assert torch.equal(probe.seen[task][n], 0.5 * theta0[n] + 0.5 * end[n]), (task, n)
    assert any(not torch.equal(snap.start[1][n], theta0[n]) for n in trainable)  # task 2 started elsewhere
    with pytest.raises(ConfigError, match="reference"):
        WiSEFT(reference="previous")
