"""Data sources on real files: LLaVA JSON / JSONL with PNGs, `datasets` folders, Mix, TaskStream."""

from __future__ import annotations

import json

import datasets
import pytest
from PIL import Image

from mllm_cl.data import HFDataset, LlavaJson, Mix, Synthetic, Task, TaskStream
from mllm_cl.errors import DataError
from mllm_cl.module import MLLMModule
from tests.helpers import quiet_trainer

COLOURS = {"red.png": (220, 30, 30), "blue.png": (40, 80, 220)}

RECORDS = [
    {
        "id": "r0",
        "image": "red.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Is it a square?"},
            {"from": "gpt", "value": "yes"},
        ],
    },
    {
        "id": "r1",
        "image": ["blue.png"],
        "conversations": [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "blue"}],
        "answers": ["blue", "dark blue"],
    },
    {"id": "r2", "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]},
]


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (20, 12), rgb).save(folder / name)
    return folder


def write_json(path, records):
    path.write_text(json.dumps(records, indent=2))
    return str(path)


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_llava_json_loads_and_maps_roles(tmp_path, images, fmt):
    writer = write_json if fmt == "json" else write_jsonl
    path = writer(tmp_path / f"data.{fmt}", RECORDS)
    table = LlavaJson(path, image_folder=str(images)).load()
    assert len(table) == 3

    first = table[0]
    assert first["id"] == "r0"
    assert [m["role"] for m in first["messages"]] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in first["messages"]] == [
        "<image>\nWhat colour is it?",
        "red",
        "Is it a square?",
        "yes",
    ]
    assert first["answers"] == ["yes"]  # default reference: the last gpt turn
    assert len(first["images"]) == 1
    img = first["images"][0]
    assert img.mode == "RGB" and img.size == (20, 12) and img.getpixel((3, 3)) == COLOURS["red.png"]

    assert table[1]["answers"] == ["blue", "dark blue"]
    assert table[1]["images"][0].getpixel((0, 0)) == COLOURS["blue.png"]
    assert table[2]["images"] == []
    assert len(LlavaJson(path, image_folder=str(images), limit=2).load()) == 2


def test_image_folder_defaults_to_the_files_folder(images):
    path = write_json(images / "data.json", RECORDS[:1])
    assert LlavaJson(path).load()[0]["images"][0].size == (20, 12)


@pytest.mark.parametrize(("fmt", "where"), [("json", "record 1"), ("jsonl", ":2")])
def test_missing_image_names_file_and_record(tmp_path, images, fmt, where):
    records = [RECORDS[0], {**RECORDS[1], "image": "missing.png"}]
    path = (write_json if fmt == "json" else write_jsonl)(tmp_path / f"data.{fmt}", records)
    with pytest.raises(DataError) as info:
        LlavaJson(path, image_folder=str(images)).load()
    message = str(info.value)
    assert path in message and where in message and "missing.png" in message


def test_malformed_jsonl_line_names_the_line(tmp_path, images):
    path = tmp_path / "data.jsonl"
    path.write_text(
        json.dumps(RECORDS[0]) + "\n\n" + '{"id": "x", "conversations": [\n' + json.dumps(RECORDS[2]) + "\n"
    )
    with pytest.raises(DataError) as info:
        LlavaJson(str(path), image_folder=str(images)).load()
    assert f"{path}:3:" in str(info.value)


def test_malformed_json_list_names_file_and_line(tmp_path, images):
    path = tmp_path / "data.json"
    good = json.dumps(RECORDS[2])
    path.write_text(f'[\n  {good},\n  {{"id": oops}}\n]\n')
    with pytest.raises(DataError) as info:
        LlavaJson(str(path), image_folder=str(images)).load()
    assert f"{path}:3:" in str(info.value) and "malformed JSON" in str(info.value)


def test_json_that_is_not_a_list_is_rejected(tmp_path):
    path = write_json(tmp_path / "data.json", RECORDS[2])
    with pytest.raises(DataError, match="expected a JSON list"):
        LlavaJson(path).load()


@pytest.mark.parametrize(("fmt", "where"), [("json", "record 1"), ("jsonl", ":2")])
def test_record_without_gpt_turn(tmp_path, images, fmt, where):
    no_answer = {"id": "q", "conversations": [{"from": "human", "value": "Hello?"}]}
    path = (write_json if fmt == "json" else write_jsonl)(tmp_path / f"data.{fmt}", [RECORDS[2], no_answer])
    with pytest.raises(DataError) as info:
        LlavaJson(path, image_folder=str(images)).load()
    message = str(info.value)
    assert path in message and where in message and "no answer" in message


def test_corrupt_image_fails_on_access_naming_the_image(tmp_path, images):
    (images / "broken.png").write_bytes(b"this is not a PNG file at all")
    path = write_json(tmp_path / "data.json", [RECORDS[2], {**RECORDS[1], "image": "broken.png"}])
    table = LlavaJson(path, image_folder=str(images)).load()  # the file exists: load succeeds
    assert table[0]["id"] == "r2"
    with pytest.raises(DataError) as info:
        table[1]
    message = str(info.value)
    assert str(images / "broken.png") in message and f"{path} record 1" in message


def save_qa_dataset(folder, n: int = 3):
    rows = {
        "img": [Image.new("RGB", (8, 8), (10 * i, 0, 0)) for i in range(n)],
        "q": [f"question {i}" for i in range(n)],
        "a": [f"answer {i}" for i in range(n)],
        "refs": [[f"answer {i}", f"alt {i}"] for i in range(n)],
    }
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "q": datasets.Value("string"),
            "a": datasets.Value("string"),
            "refs": datasets.List(datasets.Value("string")),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return str(folder)


def test_hf_dataset_with_configured_columns(tmp_path):
    path = save_qa_dataset(tmp_path / "ds")
    src = HFDataset(path, image_column="img", question_column="q", answer_column="a", answers_column="refs")
    table = src.load()
    assert len(table) == 3
    row = table[2]
    assert row["messages"] == [
        {"role": "user", "content": "question 2"},
        {"role": "assistant", "content": "answer 2"},
    ]
    assert row["answers"] == ["answer 2", "alt 2"]
    assert row["images"][0].mode == "RGB" and row["images"][0].getpixel((0, 0)) == (20, 0, 0)
    assert (
        len(HFDataset(path, image_column="img", question_column="q", answer_column="a", limit=2).load()) == 2
    )


def test_hf_dataset_missing_column_names_columns(tmp_path):
    path = save_qa_dataset(tmp_path / "ds")
    with pytest.raises(DataError) as info:
        HFDataset(path, image_column="img", question_column="question", answer_column="a").load()
    message = str(info.value)
    assert path in message and "'question'" in message
    for column in ("img", "q", "a", "refs"):
        assert f"'{column}'" in message


def test_hf_dataset_picks_the_split_of_a_dataset_dict(tmp_path):
    save_qa_dataset(tmp_path / "a", n=2)
    save_qa_dataset(tmp_path / "b", n=4)
    both = datasets.DatasetDict(
        {
            "train": datasets.load_from_disk(str(tmp_path / "a")),
            "test": datasets.load_from_disk(str(tmp_path / "b")),
        }
    )
    both.save_to_disk(str(tmp_path / "dd"))
    kwargs = dict(image_column="img", question_column="q", answer_column="a")
    assert len(HFDataset(str(tmp_path / "dd"), **kwargs).load()) == 2
    assert len(HFDataset(str(tmp_path / "dd"), split="test", **kwargs).load()) == 4


def test_mix_concatenates_in_order(tmp_path, images):
    json_path = write_json(tmp_path / "data.json", RECORDS)
    ds_path = save_qa_dataset(tmp_path / "ds", n=2)
    mix = Mix(
        [LlavaJson(json_path, image_folder=str(images)), HFDataset(ds_path, "train", None, "img", "q", "a")]
    )
    table = mix.load()
    assert len(table) == 5
    assert [table[i]["id"] for i in range(5)] == ["r0", "r1", "r2", "0", "1"]
    assert table[4]["messages"][1]["content"] == "answer 1"
    with pytest.raises(IndexError):
        table[5]
    with pytest.raises(DataError, match="empty"):
        Mix([])


def test_task_stream_rejects_empty_task_source(tmp_path):
    with pytest.raises(DataError, match="data.tasks is empty"):
        TaskStream(tasks=[])
    empty = write_json(tmp_path / "empty.json", [])
    stream = TaskStream(
        tasks=[
            Task("colour", train=Synthetic("colour", n=4, seed=0, image_size=32)),
            Task("nothing", train=LlavaJson(empty)),
        ]
    )
    trainer = quiet_trainer(tmp_path)
    with pytest.raises(DataError) as info:
        trainer.fit(MLLMModule(family="llava"), datamodule=stream)
    message = str(info.value)
    assert "data.tasks[1].train (nothing)" in message and empty in message and "no samples" in message
