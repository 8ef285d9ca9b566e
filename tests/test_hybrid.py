"""Data-hybrid and replay (strategies/hybrid.py, strategies/replay.py): exact ratios, seeds, buffers."""

from __future__ import annotations

import io
import json

import lightning as L
import pytest
import torch
from PIL import Image

from mllm_cl.data import LlavaJson, Synthetic, Task, TaskStream
from mllm_cl.data.collate import Encoder
from mllm_cl.data.stream import TaskSampler
from mllm_cl.errors import ConfigError
from mllm_cl.module import MLLMModule
from strategies.freeze import SAProj
from strategies.hybrid import DataHybrid, compose, split_counts
from strategies.replay import Replay
from tests.helpers import quiet_trainer


def test_compose_counts_are_exact_and_every_window_is_close():
    own, a, b = (
        [("own", i) for i in range(300)],
        [("a", i) for i in range(70)],
        [("b", i) for i in range(5000)],
    )
    table = compose([own, a, b], [0.1, 0.2], 10_000, seed=3)
    kinds = [table[j][0] for j in range(len(table))]
    assert len(table) == 10_000
    assert (kinds.count("own"), kinds.count("a"), kinds.count("b")) == (7000, 1000, 2000)
    # The sampler reshuffles: windows of 1000 (e.g. 62 batches of 16) stay within 5 sd of r.
    order = TaskSampler(len(table), len(table), seed=0).global_order()
    for w in range(0, 10_000, 1000):
        window = [kinds[j] for j in order[w : w + 1000]]
        assert abs(window.count("a") / 1000 - 0.1) < 0.05 and abs(window.count("b") / 1000 - 0.2) < 0.065
    # Small sources are cycled in full passes: every item of `a` appears 1000 // 70 or one more times.
    uses = [sum(1 for j in range(len(table)) if table.refs[j] == (1, i)) for i in range(70)]
    assert set(uses) <= {1000 // 70, 1000 // 70 + 1}


def test_same_seed_same_order_and_rounding():
    tables = [list(range(50)), list(range(50, 60))]
    first, again, other = (compose(tables, [0.3], 97, s) for s in (1, 1, 2))
    assert list(first) == list(again) and list(first) != list(other)
    assert split_counts(97, [0.3]) == [68, 29] and sum(split_counts(7, [0.5, 0.25])) == 7


def test_bad_ratios_are_one_line_errors():
    with pytest.raises(ConfigError, match="ratios"):
        DataHybrid([Synthetic("shape", n=4)], [0.6, 0.5])
    with pytest.raises(ConfigError, match="sum to < 1"):
        Replay(ratio=1.0)


def test_replay_reservoir_is_bounded_and_uniform():
    replay = Replay(size=300, ratio=0.25, policy="reservoir", seed=0)
    for task, n in enumerate([1000, 1000, 50, 2000]):
        replay.add_task(task, n)
        assert len(replay.buffer) <= 300 and len(set(replay.buffer)) == len(replay.buffer)
    counts = replay.counts()
    # Uniform over all 4050 samples seen: each task's share tracks its size (±6 sd-ish).
    for task, n in enumerate([1000, 1000, 50, 2000]):
        assert abs(counts.get(task, 0) - 300 * n / 4050) < 30, counts
    replay.add_task(3, 2000)  # a resumed task end is not added twice
    assert replay.seen == 4050


def test_replay_balanced_keeps_equal_shares():
    replay = Replay(size=100, ratio=0.25, policy="balanced", seed=0)
    for task, n in enumerate([500, 40, 500, 500, 500, 500, 500]):
        replay.add_task(task, n)
        counts = replay.counts()
        assert len(replay.buffer) <= 100
        full = [c for t, c in counts.items() if t != 1]  # task 1 has only 40 samples to give
        assert max(full) - min(full) <= 1, counts
    assert sorted(replay.counts()) == list(range(7))


def test_replay_state_round_trip_through_a_weights_only_file():
    replay = Replay(size=20, policy="reservoir", seed=5)
    replay.add_task(0, 100)
    replay.add_task(1, 100)
    buf = io.BytesIO()
    torch.save(replay.state_dict(), buf)
    buf.seek(0)
    fresh = Replay(size=20, policy="reservoir", seed=5)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.buffer == replay.buffer and fresh.seen == replay.seen and fresh.tasks_added == [0, 1]
    replay.add_task(2, 100)
    fresh.add_task(2, 100)
    assert fresh.buffer == replay.buffer  # the resumed buffer evolves exactly like the original


class Tables(L.Callback):
    """Records the table each task actually trained on (the loader is rebuilt every epoch)."""

    def __init__(self):
        self.tables = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.tables.append(trainer.train_dataloader.dataset.table)


def fit_with(strategy, tmp_path) -> tuple[TaskStream, L.Trainer, list]:
    L.seed_everything(0)
    module = MLLMModule(family="llava", recipe=SAProj(), strategies=[strategy], lr=1e-3)
    stream = TaskStream(
        tasks=[
            Task("count", train=Synthetic("count", n=40, seed=1, image_size=32), steps=10),
            Task("colour", train=Synthetic("colour", n=40, seed=3, image_size=32), steps=10),
        ],
        heldout=[],
        batch_size=4,
        eval_limit=2,
    )
    stream.tasks[0].eval = Synthetic("count", n=2, seed=2, image_size=32)
    trainer = quiet_trainer(tmp_path, callbacks=[tables := Tables()])
    trainer.fit(module, datamodule=stream)
    return stream, trainer, tables.tables


def task_ids(table) -> list[str]:
    """Sample ids of a task's table, checking a 2-process split covers it exactly once."""
    n = len(table)
    ranks = [TaskSampler(n, n // 2, seed=7, rank=r, world=2) for r in (0, 1)]
    seen = sorted(i for s in ranks for i in s)
    assert seen == list(range(n))  # disjoint rank slices cover the table exactly once
    return [table[i]["id"] for i in range(n)]


def test_hybrid_in_a_real_fit_mixes_exactly(tmp_path):
    _, trainer, tables = fit_with(
        DataHybrid([Synthetic("shape", n=40, seed=9, image_size=32)], [0.25], seed=1), tmp_path
    )
    assert trainer.global_step == 20  # steps per task unchanged
    assert sum(i.startswith("shape") for i in task_ids(tables[0])) == 10  # every task is mixed
    ids = task_ids(tables[1])
    assert len(ids) == 40  # 10 steps x batch 4
    assert sum(i.startswith("shape") for i in ids) == 10 and sum(i.startswith("colour") for i in ids) == 30


def test_replay_in_a_real_fit_rehearses_task_one(tmp_path):
    replay = Replay(size=8, ratio=0.25, policy="reservoir", seed=0)
    stream, _, tables = fit_with(replay, tmp_path)
    assert sorted(replay.counts()) == [0, 1] and len(replay.buffer) == 8
    assert task_ids(tables[0]) == [stream._train[0][i]["id"] for i in range(40)]  # nothing to replay yet
    ids = task_ids(tables[1])
    from_buffer = [i for i in ids if i.startswith("count")]
    assert len(from_buffer) == 10
    memory = tables[1].tables[1].refs  # the buffer as it was when task 2 started: task 1 only
    assert len(memory) == 8 and {t for t, _ in memory} == {0}
    assert set(from_buffer) <= {stream._train[0][i]["id"] for _, i in memory}


def llava_source(folder, n: int) -> str:
    """A LLaVA JSON file of n records over three real PNGs (ids src0, src1, ...)."""
    for k, rgb in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        Image.new("RGB", (32, 32), rgb).save(folder / f"{k}.png")
    records = [
        {"id": f"src{i}", "image": f"{i % 3}.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                           {"from": "gpt", "value": ["red", "green", "blue"][i % 3]}]}
        for i in range(n)
    ]  # fmt: skip
    (folder / "src.json").write_text(json.dumps(records))
    return str(folder / "src.json")


@pytest.mark.parametrize("cache", [True, False])
def test_a_hybrid_task_encodes_only_the_samples_it_draws(tmp_path, monkeypatch, cache):
    encoded = []  # ids of the source samples the encoder saw: cache records or on-the-fly encodings
    for name in ("record", "encode_train"):
        real = getattr(Encoder, name)

        def counted(self, sample, *args, _real=real):
            if sample["id"].startswith("src") and "_tokens" not in sample:
                encoded.append(sample["id"])
            return _real(self, sample, *args)

        monkeypatch.setattr(Encoder, name, counted)
    source = LlavaJson(llava_source(tmp_path, 300), cache_dir=str(tmp_path / "cache"))
    hybrid = DataHybrid([source], [0.5], seed=4)
    module = MLLMModule(family="llava", recipe=SAProj(), strategies=[hybrid], lr=1e-3)
    task = Task("colour", train=Synthetic("colour", n=8, seed=3, image_size=32), steps=3)
    stream = TaskStream(tasks=[task], batch_size=4, cache_processed=cache, cache_dir=str(tmp_path / "cache"))
    trainer = quiet_trainer(tmp_path, callbacks=[tables := Tables()])
    trainer.fit(module, datamodule=stream)
    trained = [tables.tables[0][j]["id"] for j in range(len(tables.tables[0]))]
    drawn = [i for i in trained if i.startswith("src")]
    assert len(trained) == 12 and len(drawn) == 6  # 3 steps x batch 4, half of them from the source
    assert sorted(encoded) == sorted(drawn)  # each drawn sample encoded once; none of the other 294
    # The same draws as mixing the whole source (what was trained before only the drawn were kept).
    full = compose([stream.train_table(0), source.load()], [0.5], 12, seed=4 * 1000 + 0)
    assert trained == [full[j]["id"] for j in range(12)]
