"""A tiny CPU fit whose eval sets are benchmark presets on fixture data: predictions with parts."""

from __future__ import annotations

import json

import datasets
import pytest
from datasets import Features

from mllm_cl.cli import main
from tests.helpers import write_config
from tests.test_presets import SPECS, img


def _save(tmp_path, name: str, n: int) -> str:
    columns, features, *_ = SPECS[name]
    rows = {k: v * n for k, v in columns.items()}
    if "question_id" in rows:
        rows["question_id"] = list(range(n))
    rows["image"] = [img((40 * i % 255, 90, 30), (12 + i, 8)) for i in range(n)]
    folder = str(tmp_path / name)
    datasets.Dataset.from_dict(rows, features=Features(features)).save_to_disk(folder)
    return folder


def test_presets_in_a_fit_write_predictions_with_their_metric_parts(tmp_path):
    textvqa, timeclock = _save(tmp_path, "textvqa", 3), _save(tmp_path, "timeclock", 4)
    synthetic = {
        "class_path": "Synthetic",
        "init_args": {"skill": "colour", "n": 8, "seed": 1, "image_size": 32},
    }
    data = {
        "batch_size": 4,
        "eval_batch_size": 4,
        # the tiny word-level tokenizer knows the synthetic words only: the presets' text is <unk>
        "max_unk_answers": 1.0,
        "tasks": [
            {
                "name": "clock",
                "train": synthetic,
                "eval": {"class_path": "Benchmark", "init_args": {"name": "timeclock", "path": timeclock}},
                "steps": 2,
            }
        ],
        "heldout": [
            {
                "name": "textvqa",
                "data": {"class_path": "Benchmark", "init_args": {"name": "textvqa", "path": textvqa}},
            }
        ],
    }
    model = {"family": "llava", "tiny": "tiny", "recipe": {"class_path": "SAProj"}, "max_new_tokens": 2}
    main(["fit", "--config", str(write_config(tmp_path, "presets", model, data))])
    run = tmp_path / "presets" / "v"
    results = json.loads((run / "results.json").read_text())
    for row, label in enumerate(results["row_labels"]):
        clock = [
            json.loads(x)
            for x in (run / "predictions" / f"{row}_{label}" / "clock.jsonl").read_text().splitlines()
        ]
        vqa = [
            json.loads(x)
            for x in (run / "predictions" / f"{row}_{label}" / "textvqa.jsonl").read_text().splitlines()
        ]
        assert len(clock) == 4 and len(vqa) == 3
        # the presets' metrics: TimeClock's hour/minute/both parts, VQA over all 10 references
        assert all({"hour", "minute", "both"} <= set(r) for r in clock)
        assert all(len(r["references"]) == 10 for r in vqa)
        assert all(r["prompt"].endswith("Answer the question using a single word or phrase.") for r in vqa)
        assert all(r["prompt"].endswith("if it's 3:45, output 3:45.") for r in clock)
        means = [sum(r["score"] for r in rs) / len(rs) for rs in (clock, vqa)]
        assert means == pytest.approx(results["matrix"][row])


def test_column_settings_come_from_the_config_then_the_preset(tmp_path):
    from mllm_cl.data import Benchmark, EvalSet
    from mllm_cl.evaluation import resolve_column

    source = Benchmark(name="timeclock", path=str(tmp_path))
    preset = resolve_column("clock", source, EvalSet("clock", source), table=[])
    assert (preset.metric, preset.max_new_tokens) == ("timeclock", 32)  # LMM_CL's timeclock.yaml
    own = EvalSet("clock", source, metric="exact_match", max_new_tokens=5, metric_args={"choices": "AB"})
    column = resolve_column("clock", source, own, table=[])
    assert (column.metric, column.max_new_tokens, column.metric_args) == ("exact_match", 5, {"choices": "AB"})
    plain = EvalSet("x", Benchmark(name="ai2d"))
    assert resolve_column("x", plain.data, plain, table=[]).metric == "ai2d_letter"
