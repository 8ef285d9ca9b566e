"""`validate` / `test` subcommands: score a stream's eval sets from a fit checkpoint or an exported HF dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mllm_cl.cli import main
from tests.helpers import quiet_trainer

SOURCES = [
    {
        "class_path": "Synthetic",
        "init_args": {"skill": s, "n": 6, "seed": 11 + i, "image_size": 32, "object_size": [0.5, 0.9]},
    }
    for i, s in enumerate(("colour", "shape"))
]


def _config(out: Path) -> Path:
    """One memorisation task (eval = train) so the trained model scores far above the untrained one."""
    mix = {"class_path": "Mix", "init_args": {"sources": SOURCES}}
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "default_root_dir": str(out),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(out / "runs"), "name": "v"},
            },
            "callbacks": [
                {
                    "class_path": "mllm_cl.export.ExportHF",
                    "init_args": {"dirpath": str(out / "hf"), "last_only": True},
                }
            ],
        },
        "model": {
            "family": "llava",
            "tiny": "tiny",
            "recipe": {"class_path": "Full"},
            "lr": 3e-3,
            "warmup_ratio": 0.1,
            "max_new_tokens": 3,
        },
        "data": {
            "batch_size": 8,
            "eval_batch_size": 5,
            "tasks": [{"name": "mix", "train": mix, "eval": mix, "steps": 120}],
            "heldout": [{"name": "colour", "data": SOURCES[0], "image_domain": "ood"}],
        },
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    out = tmp_path_factory.mktemp("validate")
    config = _config(out)
    main(["fit", "--config", str(config)])
    (run,) = list((out / "runs" / "v").glob("version_*"))
    return config, out, run, json.loads((run / "results.json").read_text())


def _evaluate(command: str, config: Path, *extra: str, ckpt_run: Path | None = None) -> tuple[dict, Path]:
    """Run `command`; its record and run dir: the checkpoint's own (`ckpt_run`), else one new version."""
    before = set(config.parent.glob("runs/v/version_*"))
    main([command, "--config", str(config), *extra])
    new = set(config.parent.glob("runs/v/version_*")) - before
    (run,) = [ckpt_run] if ckpt_run is not None else new
    assert not (new and ckpt_run is not None), new  # a scored checkpoint's results go into its run
    return json.loads((run / f"eval_{command}.json").read_text()), run


def test_validate_from_checkpoint_matches_fit(fitted):
    config, _, run, results = fitted
    last = dict(zip(results["columns"], results["matrix"][-1], strict=True))
    base = dict(zip(results["columns"], results["matrix"][0], strict=True))
    assert last["mix"] > base["mix"], results["matrix"]
    ckpt = str(run / "checkpoints" / "last.ckpt")
    record, eval_run = _evaluate("validate", config, "--ckpt_path", ckpt, ckpt_run=run)
    assert (run / "config.yaml").exists() and (run / "config_validate.yaml").exists()  # fit's config kept
    assert record["stage"] == "validate" and record["ckpt_path"].endswith("last.ckpt")
    assert record["accuracy"] == pytest.approx(last)
    assert record["samples"] == {"mix": 12, "colour": 6}  # every eval sample scored once (6 per source)
    assert record["domains"]["colour"] == {"image": "ood", "text": "id"}
    events = EventAccumulator(str(eval_run))
    events.Reload()
    assert {"eval/mix", "eval/colour"} <= set(events.Tags()["scalars"])
    assert events.Scalars("eval/mix")[-1].value == pytest.approx(last["mix"])


def test_untrained_model_scores_the_base_row(fitted):
    config, _, _, results = fitted
    record, _ = _evaluate("test", config)
    assert record["stage"] == "test"
    assert record["accuracy"] == pytest.approx(
        dict(zip(results["columns"], results["matrix"][0], strict=True))
    )


def test_validate_exported_hf_dir(fitted):
    config, out, _, results = fitted
    assert (out / "hf" / "config.json").exists()
    record, _ = _evaluate("validate", config, "--model.pretrained", str(out / "hf"))
    assert record["pretrained"] == str(out / "hf")
    assert record["accuracy"] == pytest.approx(
        dict(zip(results["columns"], results["matrix"][-1], strict=True))
    )


def _emt_by_hand(prediction: str, labels: list[str], reference: str) -> float:
    """Right when the answer names exactly one of `labels` (as a word) and that one is the reference."""
    named = [label for label in labels if label in prediction.lower().replace(".", " ").split()]
    return float(len(named) == 1 and named[0] == reference)


def test_metric_args_reach_the_metric(fitted):
    """EMT on the colour set with a label set that leaves out a colour the model answers right: those
    answers name no label and score 0, so the value is below plain exact match, as computed by hand."""
    from mllm_cl.data.synthetic import COLOURS

    config, _, run, results = fitted
    row = f"{len(results['row_labels']) - 1}_{results['row_labels'][-1]}"
    fit_records = [
        json.loads(x) for x in (run / "predictions" / row / "colour.jsonl").read_text().splitlines()
    ]
    right = [r["references"][0] for r in fit_records if r["prediction"].lower() == r["references"][0]]
    assert right  # the memorised model names some colours right
    labels = [c for c in COLOURS if c != right[0]]
    emt = yaml.safe_load(config.read_text())
    emt["data"]["heldout"] = [
        {"name": "colour_emt", "data": SOURCES[0], "metric": "emt", "metric_args": {"labels": labels}}
    ]
    emt_config = config.parent / "emt.yaml"
    emt_config.write_text(yaml.safe_dump(emt))
    record, eval_run = _evaluate(  # validate writes into the run dir of the checkpoint it scores
        "validate", emt_config, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), ckpt_run=run
    )
    lines = (eval_run / "predictions" / "validate" / "colour_emt.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [r["prediction"] for r in records] == [
        r["prediction"] for r in fit_records
    ]  # same model, same answers
    by_hand = sum(_emt_by_hand(r["prediction"], labels, r["references"][0]) for r in records) / len(records)
    assert record["accuracy"]["colour_emt"] == pytest.approx(by_hand)
    assert by_hand < len(right) / len(records)  # the left-out colour's right answers do not count


def test_bad_metric_args_fail_in_one_line(tmp_path):
    from mllm_cl.data import Synthetic, TaskStream
    from mllm_cl.data.stream import EvalSet, Task
    from mllm_cl.errors import ConfigError
    from mllm_cl.module import MLLMModule

    data = Synthetic("classify", n=2, seed=1, image_size=32)
    stream = TaskStream(
        tasks=[Task("t", train=data)],
        heldout=[EvalSet("cls", data, metric="emt", metric_args={"nonsense": 1}, max_new_tokens=2)],
    )
    with pytest.raises(ConfigError, match="eval set 'cls': metric 'emt' with metric_args .*nonsense"):
        quiet_trainer(tmp_path).validate(MLLMModule(tiny="tiny"), datamodule=stream, verbose=False)
