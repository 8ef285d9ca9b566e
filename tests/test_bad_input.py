"""Bad input through the real CLI: exit code 2, one last stderr line naming the file / key and the
fix, no traceback, and what the run directory held before the error left intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from PIL import Image

from mllm_cl.cli import main
from strategies.base import Strategy
from tests.helpers import cli_config

RESULTS_BEFORE = '{"from": "an earlier run"}\n'


def write_record_file(folder: Path, records, name: str = "train.json", image: bool = True) -> Path:
    if image:
        Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "red.png")
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(records if isinstance(records, str) else json.dumps(records))
    return path


def record(i: int = 0, image: str | None = "red.png", question: str = "<image>\nWhat colour?", answer="red"):
    turns = [{"from": "human", "value": question}]
    if answer is not None:
        turns.append({"from": "gpt", "value": answer})
    rec = {"id": f"s{i}", "conversations": turns}
    if image:
        rec["image"] = image
    return rec


def config(tmp: Path, train: dict, **over) -> Path:
    """A one-task stream on a tiny LLaVA whose run directory is tmp/runs/bad/fixed."""
    model = {"family": "llava", "recipe": {"class_path": "SAProj"}, "max_new_tokens": 2}
    data = {"batch_size": 2, "eval_batch_size": 4, "tasks": [{"name": "t", "train": train, "steps": 2}]}
    cfg = cli_config(tmp / "runs", "bad", model, data, version="fixed")
    for key, value in over.items():
        section, name = key.split("__")
        cfg[section][name] = value
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def llava_json(path: Path, **kw) -> dict:
    return {"class_path": "LlavaJson", "init_args": {"path": str(path), **kw}}


def earlier_run_dir(tmp: Path) -> Path:
    run = tmp / "runs" / "bad" / "fixed"
    run.mkdir(parents=True)
    (run / "results.json").write_text(RESULTS_BEFORE)
    return run


def run_cli(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    err, run_cli.out = captured.err, captured.out  # stdout kept for tests that check what ran
    assert exit_info.value.code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    return last


def expect_error(tmp_path, capsys, cfg: Path, *must_contain: str, extra=(), in_training=False) -> str:
    """Errors found before training leave an earlier run's results.json byte-identical; errors
    found while training leave the rows this run already wrote (the base row) whole."""
    run = earlier_run_dir(tmp_path)
    last = run_cli(capsys, ["fit", "--config", str(cfg), *extra])
    for text in must_contain:
        assert text in last, last
    if in_training:
        assert json.loads((run / "results.json").read_text())["row_labels"] == ["base"]
    else:
        assert (run / "results.json").read_text() == RESULTS_BEFORE
    return last


def test_missing_image(tmp_path, capsys):
    data = write_record_file(tmp_path, [record(image="nowhere.png")])
    expect_error(tmp_path, capsys, config(tmp_path, llava_json(data)), "train.json record 0", "nowhere.png")


def truncated_png_data(tmp_path) -> Path:
    records = [record(i) for i in range(4)]
    records[1]["image"] = "cut.png"
    data = write_record_file(tmp_path, records)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "whole.png")
    blob = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(blob[: len(blob) // 2])  # header fine: PIL fails only on load
    return data


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_truncated_png_is_found_before_the_model_loads(tmp_path, capsys, mode):
    cfg = config(tmp_path, llava_json(truncated_png_data(tmp_path)), data__validate=mode)
    expect_error(tmp_path, capsys, cfg, "train.json record 1", "cut.png", "cannot be read")
    assert "trainable / total parameters" not in run_cli.out  # no model was built


@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_png_is_named_even_from_a_worker(tmp_path, capsys, workers):
    # data.validate off: the image is only read while training (in a dataloader worker when workers=1).
    cfg = config(
        tmp_path, llava_json(truncated_png_data(tmp_path)), data__num_workers=workers, data__validate="off"
    )
    expect_error(tmp_path, capsys, cfg, "cut.png", "record 1", in_training=True)


def test_malformed_jsonl_line(tmp_path, capsys):
    data = write_record_file(
        tmp_path, [record(0), '{"id": "s1", "conversations": [', record(2)], "train.jsonl"
    )
    expect_error(tmp_path, capsys, config(tmp_path, llava_json(data)), "train.jsonl:2", "malformed JSON")


def test_conversation_without_answer(tmp_path, capsys):
    data = write_record_file(tmp_path, [record(0), record(1, answer=None)])
    expect_error(tmp_path, capsys, config(tmp_path, llava_json(data)), "train.json record 1", "no answer")


def test_wrong_number_of_image_placeholders(tmp_path, capsys):
    data = write_record_file(tmp_path, [record(0, question="<image>\n<image>\nWhat colour?")] * 2)
    cfg = config(tmp_path, llava_json(data))
    expect_error(tmp_path, capsys, cfg, "train.json record 0", "'s0'", "2 <image> placeholders but 1 images")


def test_overlength_error_names_the_sample(tmp_path, capsys):
    data = write_record_file(tmp_path, [record(0), record(1)])
    cfg = config(tmp_path, llava_json(data), data__max_length=8, data__overlength="error")
    expect_error(tmp_path, capsys, cfg, "'s0'", "max_length=8", in_training=True)


def test_empty_task(tmp_path, capsys):
    data = write_record_file(tmp_path, [], image=False)
    expect_error(tmp_path, capsys, config(tmp_path, llava_json(data)), "data.tasks[0].train", "no samples")


def test_recipe_matching_nothing(tmp_path, capsys):
    data = write_record_file(tmp_path, [record(0)])
    cfg = config(tmp_path, llava_json(data))
    extra = ["--model.recipe", "Patterns", "--model.recipe.init_args.patterns", "[nothing\\.here]"]
    expect_error(tmp_path, capsys, cfg, "model.recipe Patterns", "matches no parameter", extra=extra)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (["--model.recipe", "NoSuchRecipe"], "model.recipe"),
        (["--model.recipe", "SAProj", "--model.recipe.init_args.patterns_", "[x]"], "patterns_"),
        (["--data.batch_sise", "2"], "batch_sise"),
    ],
)
def test_yaml_mistakes_name_the_key(tmp_path, capsys, override, key):
    data = write_record_file(tmp_path, [record(0)])
    last = expect_error(tmp_path, capsys, config(tmp_path, llava_json(data)), key, extra=override)
    assert len(last) < 400


def test_nonfinite_loss_stops_with_task_and_step(tmp_path, capsys):
    data = write_record_file(tmp_path, [record(i) for i in range(4)])
    cfg = config(tmp_path, llava_json(data), model__lr=1.0e30, model__recipe={"class_path": "Full"})
    last = run_cli(capsys, ["fit", "--config", str(cfg)])
    assert "task 0 (t) step" in last and "model.nonfinite_loss" in last, last
    results = json.loads((tmp_path / "runs" / "bad" / "fixed" / "results.json").read_text())
    assert results["row_labels"] == ["base"]  # written before the error, still whole


class NonFiniteAt(Strategy):
    """Adds NaN to the loss of the listed micro-batches (counted from the run's first).

    Args:
        batches: which micro-batches get a NaN loss.
    """

    def __init__(self, batches: list[int]):
        self.batches, self.seen = list(batches), 0

    def loss(self, ctx, batch, outputs):
        self.seen += 1
        return outputs.loss * float("nan") if self.seen - 1 in self.batches else None


class TrainableAtBatchStart(L.Callback):
    """Class-level record, per micro-batch before it runs: the trainable weights and AdamW's step counts."""

    weights: list = []
    adam_steps: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        named = [(n, p) for n, p in pl_module.model.named_parameters() if p.requires_grad]
        TrainableAtBatchStart.weights.append({n: p.detach().clone() for n, p in named})
        state = trainer.optimizers[0].state
        TrainableAtBatchStart.adam_steps.append(
            {int(state[p]["step"]) if p in state else 0 for _, p in named}
        )


def test_nonfinite_loss_skip_makes_no_optimizer_step(tmp_path):
    """Batches 1 and 2 of 4 have a NaN loss: with "skip" they change no weight and no AdamW moment
    (not even through momentum from batch 0), and the counter reads exactly 1 then 2."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_record_file(tmp_path, [record(i) for i in range(4)])
    cfg = config(
        tmp_path,
        llava_json(data),
        model__lr=1.0e-2,
        model__warmup_ratio=0.0,
        model__nonfinite_loss="skip",
        model__strategies=[
            {"class_path": "tests.test_bad_input.NonFiniteAt", "init_args": {"batches": [1, 2]}}
        ],
        trainer__log_every_n_steps=1,
        trainer__callbacks=[{"class_path": "tests.test_bad_input.TrainableAtBatchStart"}],
        data__tasks=[{"name": "t", "train": llava_json(data), "steps": 4}],
    )
    TrainableAtBatchStart.weights, TrainableAtBatchStart.adam_steps = [], []
    main(["fit", "--config", str(cfg)])
    w = TrainableAtBatchStart.weights
    assert len(w) == 4

    def same(a, b):
        return all(torch.equal(a[n], b[n]) for n in a)

    assert not same(w[0], w[1])  # batch 0 trained
    assert same(w[1], w[2]) and same(w[2], w[3])  # batches 1 and 2 were skipped: bit for bit unchanged
    assert TrainableAtBatchStart.adam_steps == [{0}, {1}, {1}, {1}]  # no AdamW step for a skipped batch
    events = EventAccumulator(str(tmp_path / "runs" / "bad" / "fixed"))
    events.Reload()
    counts = [s.value for s in events.Scalars("train/nonfinite_skipped")]
    assert counts[0] == 1.0 and counts[-1] == 2.0 and set(counts) == {1.0, 2.0}  # a running count
    ckpt = torch.load(tmp_path / "runs" / "bad" / "fixed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["mllm_cl"]["counters"]["nonfinite"] == 2  # a resumed run goes on counting from 2


def test_garbage_checkpoint(tmp_path, capsys):
    data = write_record_file(tmp_path, [record(0)])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(2048))
    cfg = config(tmp_path, llava_json(data))
    expect_error(
        tmp_path,
        capsys,
        cfg,
        "--ckpt_path",
        "garbage.ckpt",
        "not a loadable checkpoint",
        extra=["--ckpt_path", str(garbage)],
    )


def test_checkpoint_of_another_recipe(tmp_path, capsys):
    data = write_record_file(tmp_path, [record(i) for i in range(4)])
    first = tmp_path / "first"
    first.mkdir()
    main(["fit", "--config", str(config(first, llava_json(data), model__recipe={"class_path": "Full"}))])
    (ckpt,) = (first / "runs" / "bad" / "fixed" / "checkpoints").glob("*.ckpt")
    assert torch.load(ckpt, weights_only=True)["mllm_cl_ckpt"]["recipe"] == "Full"
    cfg = config(tmp_path, llava_json(data))
    expect_error(tmp_path, capsys, cfg, "model.recipe.class_path", "Full' -> 'strategies.SAProj", "--force-resume",
                 extra=["--ckpt_path", str(ckpt)])  # fmt: skip
    # Forced past the config check, the checkpoint's own identity still refuses another recipe.
    (tmp_path / "runs" / "bad" / "fixed" / "results.json").unlink()
    (tmp_path / "runs" / "bad" / "fixed").rmdir()
    expect_error(
        tmp_path, capsys, cfg, "recipe Full", "SAProj", extra=["--ckpt_path", str(ckpt), "--force-resume"]
    )


def test_unwritable_run_directory(tmp_path, capsys):
    data = write_record_file(tmp_path, [record(0)])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = config(tmp_path, llava_json(data))
    last = run_cli(
        capsys, ["fit", "--config", str(cfg), "--trainer.logger.init_args.save_dir", str(blocker / "runs")]
    )
    assert "trainer.logger.init_args.save_dir" in last and "a_file" in last, last
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("policy", ["skip", "truncate"])
def test_overlength_is_counted_never_silent(tmp_path, capsys, policy):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mllm_cl.data.collate import Encoder
    from mllm_cl.data.sources import LlavaJson
    from mllm_cl.families import get_family

    long_turns = [
        {"from": "human", "value": "<image>\nWhat colour?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": " ".join(["what colour is the square"] * 12) + "?"},
        {"from": "gpt", "value": "red"},
    ]
    records = [
        record(0),
        {"id": "long", "image": "red.png", "conversations": long_turns},
        record(2),
        record(3),
    ]
    data = write_record_file(tmp_path, records)
    family = get_family("llava")
    encoder = Encoder(family, family.tiny_processor("tiny"))
    table = LlavaJson(str(data)).load()
    lengths = [encoder.encode_train(table[i])["input_ids"].shape[1] for i in range(len(table))]
    limit = max(lengths[0], lengths[2], lengths[3]) + 2
    assert lengths[1] > limit + 10  # only the long sample is over the limit
    cfg = config(
        tmp_path,
        llava_json(data),
        data__max_length=limit,
        data__overlength=policy,
        data__batch_size=4,
        trainer__log_every_n_steps=1,
    )
    main(["fit", "--config", str(cfg)])
    out = capsys.readouterr().out
    events = EventAccumulator(str(tmp_path / "runs" / "bad" / "fixed"))
    events.Reload()
    key = "skipped" if policy == "skip" else "truncated"
    counts = [s.value for s in events.Scalars(f"train/{key}_samples")]
    assert counts[-1] == 2  # the long sample, once in each of the task's 2 batches of 4
    (line,) = [x for x in out.splitlines() if "for data.max_length" in x]
    want = "2 samples skipped and 0 truncated" if policy == "skip" else "0 samples skipped and 2 truncated"
    assert want in line and "task 0 (t)" in line
    # The run's counters are in the checkpoint, so a resumed run goes on counting from 2, not 0.
    ckpt = torch.load(tmp_path / "runs" / "bad" / "fixed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["mllm_cl"]["counters"]["run"][key] == 2


@pytest.mark.parametrize(
    ("mistake", "key", "what"),
    [
        ({"class_path": "Synthetik", "init_args": {"skill": "colour", "n": 4}}, "data.tasks", "Synthetik"),
        ({"class_path": "Synthetic", "init_args": {"skil": "colour", "n": 4}}, "data.tasks", "skil"),
    ],
)
def test_yaml_class_path_and_init_arg_typos(tmp_path, capsys, mistake, key, what):
    last = expect_error(tmp_path, capsys, config(tmp_path, mistake), key, what)
    assert len(last) < 400


@pytest.mark.parametrize(
    ("over", "said"),
    [
        (
            {"trainer__callbacks": [{"class_path": "WiSEFT", "init_args": {"alpha": 1.5}}]},
            ("alpha=1.5", "[0, 1]"),
        ),
        (
            {"model__strategies": [{"class_path": "LwF", "init_args": {"temperature": 0}}]},
            ("temperature=0", "temperature > 0"),
        ),
        ({"data__validate": "quick"}, ("data.validate='quick'", "fast", "full", "off")),
        ({"data__max_unk_answers": 2.0}, ("data.max_unk_answers=2.0", "[0, 1]")),
    ],
)
def test_out_of_range_values_name_the_key_and_range(tmp_path, capsys, over, said):
    """jsonargparse re-raises an __init__'s ConfigError as a ValueError (a 75-line traceback before)."""
    data = write_record_file(tmp_path, [record(0)])
    expect_error(tmp_path, capsys, config(tmp_path, llava_json(data), **over), *said)


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--model.recipe", "SAProjj"], ("model.recipe", "unknown class 'SAProjj'", "did you mean SAProj")),
        (
            ["--model.strategies", '[{"class_path": "LwF", "init_args": {"lamb": 1}}]'],
            ("model.strategies", "LwF has no argument 'lamb'", "did you mean lam", "Valid: lam, temperature"),
        ),
    ],
)
def test_class_and_argument_typos_list_near_matches(tmp_path, capsys, extra, said):
    data = write_record_file(tmp_path, [record(0)])
    expect_error(tmp_path, capsys, config(tmp_path, llava_json(data)), *said, extra=extra)


def test_unknown_metric_stops_before_the_model_is_built(tmp_path, capsys):
    data = write_record_file(tmp_path, [record(0)])
    cfg = config(tmp_path, llava_json(data))
    over = yaml.safe_load(cfg.read_text())
    over["data"]["tasks"][0].update(eval=llava_json(data), metric="exact_matc")
    cfg.write_text(yaml.safe_dump(over))
    expect_error(tmp_path, capsys, cfg, "eval set 't'", "exact_matc")
    assert "trainable / total parameters" not in run_cli.out


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_truncated_jpeg_needs_full_validation(tmp_path, capsys, mode):
    """`fast` reads headers (a JPEG has no checksums to walk), so the cut shows while training;
    `full` decodes every image and stops before the model is built."""
    import numpy as np

    records = [record(i) for i in range(4)]
    records[2]["image"] = "cut.jpg"
    data = write_record_file(tmp_path, records)
    noise = (np.random.default_rng(0).random((128, 128, 3)) * 255).astype("uint8")
    Image.fromarray(noise).save(tmp_path / "whole.jpg", quality=95)
    blob = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(blob[: len(blob) // 2])  # header whole, pixel data cut
    cfg = config(tmp_path, llava_json(data), data__validate=mode)
    expect_error(tmp_path, capsys, cfg, "record 2", "cut.jpg", in_training=mode == "fast")
    assert ("trainable / total parameters" in run_cli.out) == (mode == "fast")


def test_answers_the_tokenizer_cannot_spell_stop_the_run(tmp_path, capsys):
    data = write_record_file(tmp_path, [record(0, answer="qwxzy"), record(1)])
    cfg = config(tmp_path, llava_json(data))
    last = expect_error(tmp_path, capsys, cfg, "data.tasks[0].train (t)", "1 of 2 answers", "'qwxzy'")
    assert "train.json record 0" in last and "data.max_unk_answers" in last


def test_unknown_words_in_questions_are_counted_in_a_warning(tmp_path, capsys):
    data = write_record_file(tmp_path, [record(0, question="<image>\nWhat colour is the qwxzy?"), record(1)])
    main(["fit", "--config", str(config(tmp_path, llava_json(data)))])
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "warning: data.tasks[0].train" in x]
    assert "1 of 2 questions and 0 of 2 answers" in line and "'qwxzy'" in line, line
