"""What a run shows in TensorBoard, read back from the real event files of a tiny CLI fit."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from mllm_cl.cli import main
from mllm_cl.results import method_name
from tests.helpers import cli_config


def _synthetic(skill: str, n: int, seed: int) -> dict:
    return {"class_path": "Synthetic", "init_args": {"skill": skill, "n": n, "seed": seed, "image_size": 32}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("board")
    model_data = {
        "model": {
            "family": "llava",
            "tiny": "tiny",
            "recipe": {"class_path": "SAProj"},
            "strategies": [{"class_path": "LwF", "init_args": {"lam": 1.0, "temperature": 2.0}}],
            "lr": 1e-3,
            "max_new_tokens": 3,
        },
        "data": {
            "batch_size": 4,
            "eval_batch_size": 8,
            "eval_limit": 10,
            "tasks": [
                {
                    "name": "count",
                    "train": _synthetic("count", 16, 1),
                    "eval": _synthetic("count", 10, 2),
                    "steps": 3,
                },
                {
                    "name": "colour",
                    "train": _synthetic("colour", 16, 3),
                    "eval": _synthetic("colour", 10, 4),
                    "steps": 3,
                },
            ],
            "heldout": [{"name": "shape", "data": _synthetic("shape", 10, 5)}],
        },
    }
    # "mllm_cl" is the CLI's default run name: the run is then named by its method.
    config = cli_config(out / "runs", "mllm_cl", **model_data, log_every_n_steps=1)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    (run_dir,) = (out / "runs").glob("*/version_*")
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    return run_dir, events


def test_run_is_named_by_its_method(run):
    run_dir, _ = run
    assert run_dir.parent.name == "saproj+lwf"
    assert json.loads((run_dir / "results.json").read_text())["name"] == "saproj+lwf"


def test_method_name_from_config():
    assert method_name({"recipe": {"class_path": "strategies.freeze.Full"}}) == "full"
    model = {
        "recipe": {"class_path": "SAProj"},
        "strategies": [{"class_path": "WiSEFT", "init_args": {"alpha": 0.5}}],
    }
    assert method_name(model) == "saproj+wiseft0.5"


def test_heatmap_and_matrix_table_at_every_row(run):
    run_dir, events = run
    assert [e.step for e in events.Images("matrix/heatmap")] == [0, 1, 2]
    assert all(e.width > 100 and e.height > 100 for e in events.Images("matrix/heatmap"))
    tables = events.Tensors("matrix/table/text_summary")
    assert [t.step for t in tables] == [0, 1, 2]
    last = tables[-1].tensor_proto.string_val[0].decode()
    table = [line for line in last.splitlines() if line.startswith("|")]
    assert table[0] == "| after | count | colour | shape |"
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [row[0] for row in cells] == ["base", "count", "colour"]
    # In % with one decimal, as the heatmap and report.md (not fractions): results.json x 100.
    matrix = json.loads((run_dir / "results.json").read_text())["matrix"]
    assert [row[1:] for row in cells] == [[f"{v * 100:.1f}" for v in row] for row in matrix]
    assert "Accuracy in %" in last


def test_sample_answers_text(run):
    run_dir, events = run
    for name in ("count", "colour", "shape"):
        texts = events.Tensors(f"answers/{name}/text_summary")
        assert [t.step for t in texts] == [0, 1, 2]
        rows = texts[0].tensor_proto.string_val[0].decode().splitlines()[2:]
        assert len(rows) == 8  # 8 of the 10 eval samples
        ids = [r.split("|")[1].strip() for r in rows]
        # the same samples every row
        assert ids == [
            r.split("|")[1].strip() for r in texts[-1].tensor_proto.string_val[0].decode().splitlines()[2:]
        ]
        saved = {
            json.loads(x)["id"]: json.loads(x)
            for x in (run_dir / "predictions" / "0_base" / f"{name}.jsonl").read_text().splitlines()
        }
        for r in rows:
            cells = [c.strip() for c in r.split("|")[1:-1]]
            assert cells[3] == " ".join(saved[cells[0]]["prediction"].split())


def test_hparams_carry_the_method_and_final_measures(run):
    run_dir, events = run
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"final/avg_accuracy", "final/learning", "final/heldout_change", "final/bwt"} <= metrics
    assert "hp_metric" not in metrics
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    assert start.hparams["recipe"].string_value == "SAProj"
    assert start.hparams["strategies"].string_value == "LwF"
    assert start.hparams["LwF.temperature"].number_value == 2.0
    assert start.hparams["method"].string_value == "saproj+lwf"
    # TensorBoard's table shows the first 5 hparams sorted by (not differs, name) (its backend's
    # _sort_and_reduce_to_hparams_limit, its frontend's Math.min(5, ...)): they must be the ones that
    # tell runs apart, not batch_size, family, lr, params_total, params_trainable (alphabetical).
    shown = sorted(experiment.hparam_infos, key=lambda h: (not h.differs, h.name))[:5]
    assert {h.name for h in shown} == {"method", "recipe", "strategies", "tasks", "params_trainable"}
    assert {"seed", "batch_size", "lr", "LwF.lam"} <= {h.name for h in experiment.hparam_infos}
    results = json.loads((run_dir / "results.json").read_text())
    final = events.Scalars("final/avg_accuracy")
    assert final[-1].value == pytest.approx(results["summary"]["avg_accuracy"])


def test_scalars_grouped_finite_with_lr(run):
    run_dir, events = run
    tags = set(events.Tags()["scalars"])
    assert {"acc/task/count", "acc/task/colour", "acc/heldout/shape", "cl/avg_accuracy"} <= tags
    assert not any(t.startswith(("matrix/", "stream/", "params/")) or t == "train/task" for t in tags)
    assert "train/loss" in tags and "train/LwF" in tags  # a strategy term: the total is logged too
    assert any(t.startswith("lr-") for t in tags)
    for tag in tags:
        assert all(math.isfinite(e.value) for e in events.Scalars(tag)), tag
    # forgetting needs two trained tasks: absent from rows 0-1, present at row 2
    assert [e.step for e in events.Scalars("cl/forgetting")] == [2]
    results = json.loads((run_dir / "results.json").read_text())
    assert [e.value for e in events.Scalars("acc/heldout/shape")] == pytest.approx(
        [r[2] for r in results["matrix"]]
    )
