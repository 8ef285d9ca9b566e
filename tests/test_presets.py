"""Benchmark presets on fixture datasets with the real column names and types, saved with `datasets`.

The expected prompts are written out by hand from /work/shared/BENCHMARKS.md (pre/post prompts,
option lines), not built by the code under test.
"""

from __future__ import annotations

import importlib
import pickle

import datasets
import pytest
from datasets import Features, Value
from PIL import Image

from mllm_cl.data import Benchmark
from mllm_cl.errors import ConfigError, DataError
from mllm_cl.metrics import build_metric

IMAGE, TEXT, TEXTS = datasets.Image(), Value("string"), datasets.List(Value("string"))
LETTER = "Answer with the option's letter from the given choices directly."
PHRASE = "\nAnswer the question using a single word or phrase."


def img(rgb=(200, 30, 30), size=(12, 8)):
    return Image.new("RGB", size, rgb)


TEXTVQA_ANSWERS = ["canon", "nikon", "nikon", "canon", "nikon", "sony", "nikon", "canon", "sony", "nikon"]

# name -> (columns with one or two rows, features, expected prompt of row 0, answers, fields, metric, cap)
SPECS = {
    "cub200": (
        {"image": [img()], "answer": ["B"],
         "question": ["<image>\nWhat species is the bird in this photo?\n" + LETTER
                      + "\nA. Black footed Albatross\nB. Laysan Albatross\nC. Sooty Albatross"]},
        {"image": IMAGE, "question": TEXT, "answer": TEXT},
        "\nWhat species is the bird in this photo?\nAnswer with the option's letter from the given choices "
        "directly.\nA. Black footed Albatross\nB. Laysan Albatross\nC. Sooty AlbatrossAnswer with the "
        "option's letter from the given choices directly.",
        ["B"], {}, "cub_letter", 16,
    ),
    "pixmocount": (
        {"image": [img()], "question": ["How many dogs are in this image?\n<image>"],
         "answer": ["There are 3 dogs in this image."]},
        {"image": IMAGE, "question": TEXT, "answer": TEXT},
        "How many dogs are in this image?\nAnswer with integer and nothing else. For example, if the answer "
        "is 1, you should output 1.",
        ["There are 3 dogs in this image."], {}, "pixmocount", 16,
    ),
    "pathvqa": (
        {"image": [img()], "question": ["is there necrosis?"], "answer": ["yes"]},
        {"image": IMAGE, "question": TEXT, "answer": TEXT},
        "Look at the medical image and answer the following question: is there necrosis?\nFor questions "
        "that can be answered with a yes or no, just answer yes or no. Otherwise, provide an answer in the "
        "medical domain.",
        ["yes"], {"question": "is there necrosis?"}, "pathvqa", 64,
    ),
    "textvqa": (
        {"image": [img()], "question": ["what brand is the CAMERA?"], "answers": [TEXTVQA_ANSWERS],
         "question_id": [34602], "image_id": ["003a8ae2ef43b901"], "ocr_tokens": [["NIKON", "D90"]]},
        {"image": IMAGE, "question": TEXT, "answers": TEXTS, "question_id": Value("int64"), "image_id": TEXT,
         "ocr_tokens": TEXTS},
        "What brand is the camera?" + PHRASE,
        TEXTVQA_ANSWERS, {}, "vqa", 64,
    ),
    "timeclock": (
        {"image": [img()], "question": ["What time does the clock show in this image?\n<image>"],
         "answer": ["10:08"]},
        {"image": IMAGE, "question": TEXT, "answer": TEXT},
        "What time does the clock show in this image?\nAnswer with the time in HH:MM format. For example, "
        "if it's 3:45, output 3:45.",
        ["10:08"], {}, "timeclock", 32,
    ),
    "ai2d": (
        {"image": [img()], "question": ["Which label shows the leaf?"],
         "options": [["stem", "leaf", "root", "flower"]], "answer": ["1"]},
        {"image": IMAGE, "question": TEXT, "options": TEXTS, "answer": TEXT},
        "Which label shows the leaf?\nA. stem\nB. leaf\nC. root\nD. flower\n" + LETTER,
        ["B"], {}, "ai2d_letter", 16,
    ),
    "chartqa": (
        {"image": [img()], "type": ["human_test"], "question": ["What is the value of Asia?"],
         "answer": ["12.5"]},
        {"image": IMAGE, "type": TEXT, "question": TEXT, "answer": TEXT},
        "What is the value of Asia?\nAnswer the question with a single word.",
        ["12.5"], {"type": "human_test"}, "relaxed_accuracy", 16,
    ),
    "docvqa_val": (
        {"questionId": ["49153"], "question": ["What is the date?"], "question_types": [["handwritten"]],
         "image": [img()], "docId": [14465], "answers": [["May 2, 1978", "2 May 1978"]]},
        {"questionId": TEXT, "question": TEXT, "question_types": TEXTS, "image": IMAGE,
         "docId": Value("int64"), "answers": TEXTS},
        "What is the date?" + PHRASE,
        ["May 2, 1978", "2 May 1978"], {}, "anls", 32,
    ),
    "infovqa_val": (
        {"questionId": ["98313"], "question": ["Which social platform has heavy female audience?"],
         "image": [img()], "answers": [["pinterest"]]},
        {"questionId": TEXT, "question": TEXT, "image": IMAGE, "answers": TEXTS},
        "Which social platform has heavy female audience?" + PHRASE,
        ["pinterest"], {}, "anls", 32,
    ),
    "realworldqa": (
        {"image": [img()], "answer": ["B"],
         "question": ["How many lanes are there?\nA. 2\nB. 3\nC. 4\nPlease answer directly with only the "
                      "letter of the correct option and nothing else.  \n"]},
        {"image": IMAGE, "question": TEXT, "answer": TEXT},
        "How many lanes are there?\nA. 2\nB. 3\nC. 4\nPlease answer directly with only the letter of the "
        "correct option and nothing else.",
        ["B"], {}, "realworldqa", 16,
    ),
    "scienceqa_img": (
        {"image": [img(), None], "question": ["Which is a mammal?", "Which word is a noun?"],
         "choices": [["frog", "cat", "trout"], ["run", "table"]], "answer": [1, 1],
         "hint": ["Read the text about animals.", ""], "subject": ["natural science", "language science"]},
        {"image": IMAGE, "question": TEXT, "choices": TEXTS, "answer": Value("int8"), "hint": TEXT,
         "subject": TEXT},
        "Context: Read the text about animals.\nWhich is a mammal?\nA. frog\nB. cat\nC. trout\n" + LETTER,
        ["B"], {}, "scienceqa_letter", 16,
    ),
    "mmstar": (
        {"index": [7], "question": ["Is the man smiling? Please answer yes or no.\nOptions: A: yes, B: no  "],
         "answer": ["A"], "category": ["coarse perception"], "l2_category": ["image emotion"],
         "image": [img()]},
        {"index": Value("int64"), "question": TEXT, "answer": TEXT, "category": TEXT, "l2_category": TEXT,
         "image": IMAGE},
        "Is the man smiling?\nOptions: A: yes, B: no\nAnswer with the option's letter from the given "
        "choices directly",
        ["A"], {"l2_category": "image emotion"}, "mmstar", 32,
    ),
    "ocrbench": (
        {"dataset": ["IIIT5K"], "question": [" what is written in the image? "],
         "question_type": ["Regular Text Recognition"], "answer": [["HELLO"]], "image": [img()]},
        {"dataset": TEXT, "question": TEXT, "question_type": TEXT, "answer": TEXTS, "image": IMAGE},
        "what is written in the image?",
        ["HELLO"], {"dataset": "IIIT5K"}, "ocrbench", 64,
    ),
    "seedbench": (
        {"answer": ["C", "A"], "choice_a": ["walking", "a red car"], "choice_b": ["running", "a bus"],
         "choice_c": ["jumping", "a bike"], "choice_d": ["sitting", "a train"], "data_id": ["v1", "1454426"],
         "data_type": ["video", "image"], "question": ["What is he doing?", "What vehicle is shown?"],
         "question_id": ["v101", "101669"], "question_type_id": [10, 1], "image": [[], [img()]]},
        {"answer": TEXT, "choice_a": TEXT, "choice_b": TEXT, "choice_c": TEXT, "choice_d": TEXT,
         "data_id": TEXT, "data_type": TEXT, "question": TEXT, "question_id": TEXT,
         "question_type_id": Value("int64"), "image": datasets.List(IMAGE)},
        "What vehicle is shown?\nA. a red car\nB. a bus\nC. a bike\nD. a train\n" + LETTER,
        ["A"], {}, "seed_letter", 16,
    ),
}  # fmt: skip


def save(tmp_path, name: str, columns: dict, features: dict) -> str:
    folder = str(tmp_path / name)
    datasets.Dataset.from_dict(columns, features=Features(features)).save_to_disk(folder)
    return folder


@pytest.mark.parametrize("name", list(SPECS))
def test_preset_prompt_answers_fields_and_metric(tmp_path, name):
    columns, features, prompt, answers, fields, metric, cap = SPECS[name]
    table = Benchmark(name=name, path=save(tmp_path, name, columns, features)).load()
    sample = table[0]
    assert sample["messages"][0] == {"role": "user", "content": prompt}
    assert sample["answers"] == answers and sample["fields"] == fields
    assert [im.size for im in sample["images"]] == [(12, 8)] and sample["images"][0].mode == "RGB"
    assert Benchmark(name=name).eval_defaults == {"metric": metric, "metric_args": {}, "max_new_tokens": cap}
    # The chosen metric reads the sample's fields and prompt: its first reference scores 1
    # (TextVQA: "canon" is 3 of 10 answers -> (3 * 2/3 + 7 * 1) / 10).
    scorer = build_metric(metric)
    given = {**{k: [v] for k, v in sample["fields"].items()}, "prompt": [prompt]}
    scorer.update([answers[0]], [sample["answers"]], **{k: given[k] for k in scorer.sample_fields})
    assert scorer.compute().item() == pytest.approx(0.9 if name == "textvqa" else 1.0)


def test_ids_from_the_id_columns(tmp_path):
    for name, expected in [("textvqa", "34602"), ("mmstar", "7"), ("docvqa_val", "49153"), ("chartqa", "0")]:
        columns, features, *_ = SPECS[name]
        assert Benchmark(name=name, path=save(tmp_path, name, columns, features)).load()[0]["id"] == expected


def test_scienceqa_without_image_and_hint(tmp_path):
    columns, features, *_ = SPECS["scienceqa_img"]
    sample = Benchmark(name="scienceqa_img", path=save(tmp_path, "sqa", columns, features)).load()[1]
    assert sample["images"] == []
    assert sample["messages"][0]["content"] == "Which word is a noun?\nA. run\nB. table\n" + LETTER


def test_seedbench_keeps_image_rows_only(tmp_path):
    columns, features, *_ = SPECS["seedbench"]
    table = Benchmark(name="seedbench", path=save(tmp_path, "seed", columns, features)).load()
    assert len(table) == 1 and table[0]["id"] == "101669"


def test_train_split_gives_training_samples(tmp_path):
    columns, features, *_ = SPECS["textvqa"]
    folder = str(tmp_path / "textvqa")
    ds = datasets.Dataset.from_dict(columns, features=Features(features))
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(folder)
    train = Benchmark(name="textvqa", split="train", path=folder).load()[0]
    # LMM_CL's converter: the question as is, answered with the most common of the 10 answers.
    assert train["messages"] == [
        {"role": "user", "content": "what brand is the CAMERA?"},
        {"role": "assistant", "content": "nikon"},
    ]
    evaluation = Benchmark(name="textvqa", path=folder).load()[0]
    assert evaluation["messages"][0]["content"] == "What brand is the camera?" + PHRASE
    pv_columns, pv_features, *_ = SPECS["pathvqa"]
    pv = datasets.Dataset.from_dict(pv_columns, features=Features(pv_features))
    datasets.DatasetDict({"train": pv, "test": pv}).save_to_disk(str(tmp_path / "pv"))
    sample = Benchmark(name="pathvqa", split="train", path=str(tmp_path / "pv")).load()[0]
    assert sample["messages"][0]["content"] == "is there necrosis?"
    assert sample["messages"][1]["content"] == "yes"
    with pytest.raises(DataError, match="no split 'validation'"):
        Benchmark(name="pathvqa", split="validation", path=str(tmp_path / "pv")).load()


def test_parquet_hub_snapshot_layout(tmp_path):
    """A snapshot folder: the config subfolder and the split's files are picked."""
    for config, name in [("DocVQA", "docvqa_val"), ("InfographicVQA", "infovqa_val")]:
        columns, features, *_ = SPECS[name]
        ds = datasets.Dataset.from_dict(columns, features=Features(features))
        ds.to_parquet(str(tmp_path / config / "validation-00000-of-00001.parquet"))
        other = ds.map(lambda row: {"question": "from the test split"})
        other.to_parquet(str(tmp_path / config / "test-00000-of-00001.parquet"))
    doc = Benchmark(name="docvqa_val", path=str(tmp_path)).load()
    info = Benchmark(name="infovqa_val", path=str(tmp_path)).load()
    assert len(doc) == len(info) == 1
    assert doc[0]["messages"][0]["content"] == "What is the date?" + PHRASE
    assert info[0]["answers"] == ["pinterest"] and info[0]["images"][0].size == (12, 8)
    single = Benchmark(
        name="docvqa_val", path=str(tmp_path / "DocVQA" / "test-00000-of-00001.parquet")
    ).load()
    assert single[0]["messages"][0]["content"] == "from the test split" + PHRASE


def test_tables_pickle_for_dataloader_workers(tmp_path):
    columns, features, prompt, *_ = SPECS["mmstar"]
    table = Benchmark(name="mmstar", path=save(tmp_path, "mmstar", columns, features)).load()
    assert pickle.loads(pickle.dumps(table))[0]["messages"][0]["content"] == prompt


def test_limit_and_fingerprint(tmp_path):
    columns, features, *_ = SPECS["scienceqa_img"]
    folder = save(tmp_path, "sqa", columns, features)
    full, again = (
        Benchmark(name="scienceqa_img", path=folder).load(),
        Benchmark(name="scienceqa_img", path=folder).load(),
    )
    one = Benchmark(name="scienceqa_img", path=folder, limit=1).load()
    assert len(full) == 2 and len(one) == 1
    assert full.fingerprint == again.fingerprint != one.fingerprint


def test_images_are_decoded_only_when_a_sample_is_read(tmp_path):
    columns = {"image": [img(), {"bytes": b"not an image", "path": None}], "question": ["q1", "q2"],
               "answer": ["1", "2"], "type": ["human_test", "augmented_test"]}  # fmt: skip
    folder = save(tmp_path, "chart", columns, SPECS["chartqa"][1])
    table = Benchmark(name="chartqa", path=folder).load()  # a broken image does not stop loading
    assert table[0]["answers"] == ["1"]
    with pytest.raises(DataError, match="row 1: cannot be read"):
        table[1]


def test_bad_name_and_missing_columns_fail_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="'chart_qa' is unknown; choose one of cub200, .*seedbench") as err:
        Benchmark(name="chart_qa")
    assert "\n" not in str(err.value)
    columns, features, *_ = SPECS["ai2d"]
    folder = save(tmp_path, "ai2d", {k: v for k, v in columns.items() if k != "options"},
                  {k: v for k, v in features.items() if k != "options"})  # fmt: skip
    with pytest.raises(DataError, match=r"columns \['options'\] not found") as err:
        Benchmark(name="ai2d", path=folder).load()
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="neither a save_to_disk folder nor .parquet files"):
        Benchmark(name="ai2d", path=str(tmp_path / "empty")).load()
    columns, features, *_ = SPECS["textvqa"]
    folder = save(tmp_path, "textvqa_test", {**columns, "answers": [None]}, features)  # the test split
    with pytest.raises(DataError, match="row 0: no reference answer"):
        Benchmark(name="textvqa", split="test", path=folder).load()[0]


def test_cli_resolves_the_short_class_name(tmp_path):
    import yaml

    from mllm_cl.data.benchmarks import Benchmark as Resolved
    from tests.test_configs import ROOT, parse

    config = yaml.safe_load((ROOT / "configs" / "tiny_llava_test.yaml").read_text())
    config["data"]["heldout"] = [
        {"name": "chartqa", "data": {"class_path": "Benchmark", "init_args": {"name": "chartqa", "limit": 4}}}
    ]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    heldout = parse(["fit", "--config", str(path)]).config.fit.data.heldout[0]
    module, _, cls = heldout.data.class_path.rpartition(".")
    assert getattr(importlib.import_module(module), cls) is Resolved
    assert heldout.data.init_args.name == "chartqa" and heldout.data.init_args.limit == 4
