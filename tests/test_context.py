"""The narrow strategy context: what hooks receive, what it exposes, and that no shipped strategy
reaches around it into the LightningModule or Lightning's internals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import pytest

from mllm_cl.cli import main
from mllm_cl.context import StrategyContext, TaskData
from mllm_cl.data import Synthetic, Task, TaskStream
from mllm_cl.data.store import open_entry
from mllm_cl.data.stream import EvalSet
from mllm_cl.module import MLLMModule
from strategies.base import Strategy
from strategies.freeze import SAProj
from tests.helpers import ROOT, quiet_trainer, write_config


class Recorder(Strategy):
    """Records, per hook, what it was handed and what the context says at that moment."""

    def __init__(self):
        self.calls: list[tuple[str, object, int]] = []
        self.validation = [EvalSet("val", Synthetic("shape", n=4, seed=9, image_size=32))]

    def note(self, hook, ctx, task=-1):
        self.calls.append((hook, ctx, task))

    def setup(self, ctx):
        self.note("setup", ctx)
        self.names = dict(ctx.canonical_names())

    def on_task_start(self, ctx, task):
        self.note("on_task_start", ctx, task)
        assert ctx.task == task

    def train_data(self, ctx, task, table):
        self.note("train_data", ctx, task)
        self.samples = ctx.data.task_samples(task)
        return table

    def loss(self, ctx, batch, outputs):
        self.note("loss", ctx, ctx.task)
        return None

    def on_task_end(self, ctx, task):
        self.note("on_task_end", ctx, task)

    def before_evaluation(self, ctx, task):
        self.note("before_evaluation", ctx, task)
        self.scores = {k: r.value for k, r in ctx.evaluate(self.validation).items()}
        ctx.log_metrics({"recorder/val": self.scores["val"]}, step=task)
        self.path = ctx.write_record("recorder.json", json.dumps(self.scores))


def test_every_hook_gets_the_context_never_the_module(tmp_path):
    L.seed_everything(0)
    rec = Recorder()
    module = MLLMModule(family="llava", recipe=SAProj(), strategies=[rec], max_new_tokens=2)
    src = Synthetic("colour", n=8, seed=1, image_size=32)
    stream = TaskStream(tasks=[Task("colour", train=src, eval=src, steps=3)], batch_size=2, eval_batch_size=4)
    logger = L.pytorch.loggers.CSVLogger(str(tmp_path), name="r", version="v")
    trainer = quiet_trainer(tmp_path, logger=logger, accumulate_grad_batches=2)
    trainer.fit(module, datamodule=stream)

    hooks = [h for h, _, _ in rec.calls]
    assert hooks[0] == "setup" and hooks.count("loss") == 6  # 3 optimizer steps × 2 accumulated batches
    assert {"train_data", "on_task_start", "on_task_end", "before_evaluation"} <= set(hooks)
    for hook, ctx, _ in rec.calls:
        assert isinstance(ctx, StrategyContext) and not isinstance(ctx, L.LightningModule), hook
        assert ctx is module.context  # one context per module
    assert all(task == 0 for h, _, task in rec.calls if h != "setup")
    assert rec.samples == 3 * 2 * 2 * 1  # steps × accumulation × batch × world, by hand
    assert rec.names == module.family.canonical_names(module.model)
    assert 0.0 <= rec.scores["val"] <= 1.0 and "val" not in module.results.columns  # scored apart
    assert Path(rec.path) == tmp_path / "r" / "v" / "recorder.json"
    assert json.loads(Path(rec.path).read_text()) == rec.scores
    metrics = (tmp_path / "r" / "v" / "metrics.csv").read_text()
    assert "recorder/val" in metrics.splitlines()[0]


def test_task_data_is_the_stream_seen_through_a_view():
    stream = TaskStream(
        tasks=[
            Task("a", train=Synthetic("colour", n=6, seed=1, image_size=32), steps=5),
            Task("b", train=Synthetic("shape", n=10, seed=2, image_size=32), epochs=2),
        ],
        heldout=[EvalSet("h", Synthetic("shape", n=4, seed=3, image_size=32))],
        batch_size=4,
    )
    module = MLLMModule(family="llava")
    stream.prepare_tables(module, "fit")
    data = TaskData(stream)
    assert data.tasks == ["a", "b"] and data.heldout_names == ["h"]
    assert data.eval_names[-1] == "h"
    assert [len(data.train_table(t)) for t in (0, 1)] == [6, 10]
    # No trainer attached: one process, no accumulation. Task a: 5 steps × 4; task b: 2 epochs of 10
    # samples in batches of 4 = 5 steps (floor(20 / 4)) × 4.
    assert [data.task_samples(t) for t in (0, 1)] == [20, 20]


FORBIDDEN = {
    r"\.trainer\b": "the Trainer",
    r"datamodule": "the datamodule",
    r"__dict__": "instance internals",
    r"hasattr\(": "an undeclared protocol",
    r"_canonical\b": "the module's name cache",
    r"evaluate_all": "the module's evaluation method",
    r"\.logger\b": "Lightning's logger",
    r"pl_module\.(?!context\b)": "the LightningModule",
    r"\bmodule\.": "the LightningModule",
}


@pytest.mark.parametrize("path", sorted((ROOT / "strategies").glob("*.py")), ids=lambda p: p.name)
def test_no_shipped_strategy_reaches_around_the_context(path):
    code = path.read_text()
    code = re.sub(r'"""[\s\S]*?"""', "", code)  # docstrings may talk about the module
    found = [f"{what} ({pattern})" for pattern, what in FORBIDDEN.items() if re.search(pattern, code)]
    assert not found, f"{path.name} uses {found}; go through the StrategyContext (mllm_cl/context.py)"


def test_cache_draws_a_hybrid_source_for_the_fits_devices_and_accumulation(tmp_path):
    """`cache` takes the fit's trainer: with 2 devices and accumulation 2 a task consumes
    steps 4 × accumulation 2 × batch 4 × world 2 = 64 samples, half (32) drawn from the source."""
    task = {"class_path": "Synthetic", "init_args": {"skill": "colour", "n": 8, "seed": 3, "image_size": 32}}
    source = {
        "class_path": "Synthetic",
        "init_args": {"skill": "shape", "n": 80, "seed": 4, "image_size": 32},
    }
    hybrid = {"class_path": "DataHybrid", "init_args": {"sources": [source], "ratios": [0.5]}}
    model = {"family": "llava", "recipe": {"class_path": "Full"}, "strategies": [hybrid]}
    data = {"batch_size": 4, "cache_dir": str(tmp_path / "cache"),
            "tasks": [{"name": "c", "train": task, "steps": 4, "eval": task}]}  # fmt: skip
    sizes = {}
    for devices, accumulate in ((1, 1), (2, 2)):
        config = write_config(
            tmp_path, f"d{devices}", model, data, devices=devices, accumulate_grad_batches=accumulate
        )
        with pytest.raises(SystemExit) as done:
            main(["cache", "--config", str(config)])
        assert done.value.code == 0
        for entry in (tmp_path / "cache").iterdir():
            sizes.setdefault(entry.name, len(open_entry(entry)))
    # Task table and eval set (8 each) are shared; the source's draws: 4 × 4 / 2 = 8 on one device,
    # 64 / 2 = 32 on two devices with accumulation 2 (a new entry: other samples are drawn).
    assert sorted(sizes.values()) == [8, 8, 8, 32]
