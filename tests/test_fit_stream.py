"""End-to-end: the real CLI trains a two-task stream on both families and writes its results.

Also a learning check that can fail: one task whose eval set is its train set must be learnt.
"""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mllm_cl.cli import main
from mllm_cl.continual import summarize
from mllm_cl.data import Mix, Synthetic, Task, TaskStream
from mllm_cl.module import MLLMModule
from strategies.freeze import Full
from tests.helpers import ROOT, quiet_trainer

CONFIG = ROOT / "configs" / "tiny_llava_test.yaml"
SUMMARY_KEYS = ("avg_accuracy", "learning", "forgetting", "bwt", "fwt", "heldout_change")


def nan_to_none(value):
    return None if isinstance(value, float) and math.isnan(value) else value


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def stream_run(request, tmp_path_factory):
    """Run `fit` of configs/tiny_llava_test.yaml through the CLI; returns (family, run dir)."""
    family = request.param
    out = tmp_path_factory.mktemp(f"fit-{family}")
    main(
        [
            "fit",
            "--config",
            str(CONFIG),
            "--model.family",
            family,
            "--trainer.default_root_dir",
            str(out),
            "--trainer.logger.init_args.save_dir",
            str(out / "runs"),
        ]
    )
    runs = list((out / "runs").glob("*/version_*"))
    assert len(runs) == 1, runs
    return family, runs[0]


def test_results_files(stream_run):
    family, run = stream_run
    config = yaml.safe_load(CONFIG.read_text())
    tasks = [t["name"] for t in config["data"]["tasks"]]
    heldout = [h["name"] for h in config["data"]["heldout"]]

    results = json.loads((run / "results.json").read_text())
    matrix = results["matrix"]
    assert results["row_labels"] == ["base", *tasks] == ["base", "count", "colour"]
    assert results["columns"] == tasks + heldout
    assert len(matrix) == len(tasks) + 1 and all(len(row) == len(tasks) + len(heldout) for row in matrix)
    assert all(0.0 <= v <= 1.0 for row in matrix for v in row)

    summary = results["summary"]
    assert set(SUMMARY_KEYS) <= set(summary)
    want = {k: nan_to_none(v) for k, v in summarize(matrix, len(tasks)).items()}
    assert summary == pytest.approx(want)

    with open(run / "accuracy_matrix.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["after", *tasks, *heldout]
    assert [r[0] for r in rows[1:]] == ["base", *tasks]
    in_csv = [float(v) for r in rows[1:] for v in r[1:]]
    assert in_csv == pytest.approx([v for row in matrix for v in row], abs=1e-4)

    # The run used the family asked for on the command line.
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["family"] == family
    counts = json.loads((run / "parameters.json").read_text())
    assert counts["total"]["trainable"] == counts["llm"]["trainable"] > 0  # SAProj trains only the LLM


def test_tensorboard_has_one_matrix_point_per_row(stream_run):
    _, run = stream_run
    results = json.loads((run / "results.json").read_text())
    events = EventAccumulator(str(run))
    events.Reload()
    for column, name in enumerate(results["columns"]):
        group = "task" if name in results["tasks"] else "heldout"
        scalars = events.Scalars(f"acc/{group}/{name}")
        assert [s.step for s in scalars] == [0, 1, 2]
        assert [s.value for s in scalars] == pytest.approx([row[column] for row in results["matrix"]])


def test_checkpoint_holds_the_stream_state(stream_run):
    _, run = stream_run
    checkpoints = list((run / "checkpoints").glob("*.ckpt"))
    assert len(checkpoints) == 1
    state = torch.load(checkpoints[0], map_location="cpu", weights_only=False)
    results = json.loads((run / "results.json").read_text())
    assert state["mllm_cl"]["results"]["matrix"] == results["matrix"]
    assert state["mllm_cl"]["task_started"] == 1
    assert state["global_step"] == 10  # 5 steps per task


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_memorises_a_small_task_and_batching_does_not_change_answers(family, tmp_path):
    """Full fine-tuning on 12 samples, evaluated on the same 12, must learn them.

    Colour and shape questions differ in length, so eval batches are left-padded: greedy answers
    must be the same in one batch as one prompt at a time.
    """
    L.seed_everything(0)

    def data():
        return Mix(
            [
                Synthetic("colour", n=6, seed=11, image_size=32, object_size=(0.5, 0.9)),
                Synthetic("shape", n=6, seed=12, image_size=32, object_size=(0.5, 0.9)),
            ]
        )

    module = MLLMModule(family=family, recipe=Full(), lr=3e-3, warmup_ratio=0.1, max_new_tokens=3)
    stream = TaskStream(
        tasks=[Task("mix", train=data(), eval=data(), steps=120)], batch_size=8, eval_batch_size=12
    )
    trainer = quiet_trainer(tmp_path)
    trainer.fit(module, datamodule=stream)
    (base,), (after,) = module.results.rows
    assert trainer.global_step == 120
    assert after > base and after >= 0.5, module.results.rows

    module.model.eval()
    (batch,) = list(stream.eval_loader(0))
    mask = batch["attention_mask"]
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all()  # some prompts are left-padded
    batched = module.generate(batch)
    stream.eval_batch_size = 1
    single = [answer for b in stream.eval_loader(0) for answer in module.generate(b)]
    assert batched == single


def test_predictions_files(stream_run):
    """predictions/<row>/<set>.jsonl: one record per eval sample, whose scores average to the matrix cell."""
    _, run = stream_run
    results = json.loads((run / "results.json").read_text())
    for i, label in enumerate(results["row_labels"]):
        for j, column in enumerate(results["columns"]):
            path = run / "predictions" / f"{i}_{label}" / f"{column}.jsonl"
            records = [json.loads(line) for line in path.read_text().splitlines()]
            assert len(records) == 24  # data.eval_limit
            assert len({r["id"] for r in records}) == 24
            for r in records:
                assert set(r) >= {"id", "prompt", "prediction", "references", "score"}
                assert r["references"] and isinstance(r["prediction"], str)
                assert "?" in r["prompt"]  # the question as asked
            assert sum(r["score"] for r in records) / 24 == pytest.approx(results["matrix"][i][j])


def test_result_files_are_readable_by_others(stream_run):
    """Result files get a plain file's mode (0644 under umask 022), not a temp file's 0600."""
    import os
    import stat

    _, run = stream_run
    mask = os.umask(0)
    os.umask(mask)
    for path in (
        run / "results.json",
        run / "accuracy_matrix.csv",
        next((run / "predictions").rglob("*.jsonl")),
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_report_examples_on_a_real_run(stream_run, capsys):
    from mllm_cl.predictions import changed
    from mllm_cl.report import main as report_main

    _, run = stream_run
    assert report_main([str(run), "--examples", "2", "--no-plots", "--out", str(run / "report")]) == 0
    out = capsys.readouterr().out
    assert "## Changed answers" in out
    pairs = {}
    for before, after, _, _ in changed(str(run), "shape"):
        pairs[(before, after)] = pairs.get((before, after), 0) + 1
    for (before, after), count in pairs.items():
        assert f"### shape: {before} -> {after}: {count} answers changed" in out
