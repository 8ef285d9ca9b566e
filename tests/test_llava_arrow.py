"""LLaVA JSON / JSONL converted to Arrow (mllm_cl/data/llava.py): the samples the in-memory loader
gave, streamed in chunks, checked in parallel, cached per file, damaged entries rebuilt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from mllm_cl.data import LlavaJson, llava
from mllm_cl.data.tables import ImageRef, tokens_view
from mllm_cl.errors import DataError

PIXELS = {
    "a.png": ((9, 7), (200, 10, 10)),
    "sub/b.png": ((5, 11), (10, 200, 10)),
    "c.png": ((4, 4), (1, 2, 3)),
}

# Records of every shape the loader accepts; strings hold JSON's awkward characters (brackets, commas,
# quotes, escapes, a U+2028 line separator, non-ASCII), so cutting the list into records is tested too.
RECORDS = [
    {"id": "first", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is [this], \"really\"?"}, {"from": "gpt", "value": "a {red} square"},
        {"from": "human", "value": "Sure?\u2028Line two"}, {"from": "gpt", "value": "yes \\ no"}]},
    {"id": 7, "image": ["a.png", "sub/b.png"], "answers": ["green", "lime"], "conversations": [
        {"from": "human", "value": "<image> <image> Colours?"}, {"from": "gpt", "value": "green"}]},
    {"conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüße?"},
                       {"role": "assistant", "content": "hallo"}], "extra": {"ignored": [1, 2]}},
    {"id": "last", "image": "c.png", "answers": "one answer", "conversations": [
        {"from": "Human", "value": "<image>\nHow many?"}, {"from": "GPT", "value": 3}]},
]  # fmt: skip

# What the in-memory loader returned for RECORDS (written out by hand from its rules: roles mapped,
# values as strings, answers default to the last gpt turn, id defaults to the record's position).
EXPECTED = [
    {"id": "first", "images": ["a.png"], "answers": ["yes \\ no"], "messages": [
        {"role": "user", "content": "<image>\nWhat is [this], \"really\"?"},
        {"role": "assistant", "content": "a {red} square"},
        {"role": "user", "content": "Sure?\u2028Line two"}, {"role": "assistant", "content": "yes \\ no"}]},
    {"id": "7", "images": ["a.png", "sub/b.png"], "answers": ["green", "lime"], "messages": [
        {"role": "user", "content": "<image> <image> Colours?"}, {"role": "assistant", "content": "green"}]},
    {"id": "2", "images": [], "answers": ["hallo"], "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüße?"},
        {"role": "assistant", "content": "hallo"}]},
    # (Deliberately different: the in-memory loader made a bare answers string a list of its characters.)
    {"id": "last", "images": ["c.png"], "answers": ["one answer"], "messages": [
        {"role": "user", "content": "<image>\nHow many?"}, {"role": "assistant", "content": "3"}]},
]  # fmt: skip


@pytest.fixture
def folder(tmp_path):
    for name, (size, rgb) in PIXELS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, rgb).save(tmp_path / name)
    return tmp_path


def write(folder: Path, records: list, fmt: str, name: str = "data") -> str:
    path = folder / f"{name}.{fmt}"
    if fmt == "jsonl":
        path.write_text(
            "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8"
        )
    else:  # indented, as LLaVA's own files are
        path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    return str(path)


def assert_samples(table, expected: list[dict]) -> None:
    assert len(table) == len(expected)
    for i, want in enumerate(expected):
        got = table[i]
        assert {k: got[k] for k in ("id", "messages", "answers")} == {
            k: want[k] for k in ("id", "messages", "answers")
        }
        assert [img.size for img in got["images"]] == [PIXELS[n][0] for n in want["images"]]
        assert [img.getpixel((0, 0)) for img in got["images"]] == [PIXELS[n][1] for n in want["images"]]
        assert all(img.mode == "RGB" for img in got["images"])


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
@pytest.mark.parametrize("chunk", [llava._CHUNK, 5])
def test_conversion_gives_the_samples_of_the_in_memory_loader(folder, monkeypatch, fmt, chunk):
    monkeypatch.setattr(llava, "_CHUNK", chunk)  # 5 characters: every record spans many buffer refills
    path = write(folder, RECORDS, fmt)
    table = LlavaJson(path, cache_dir=str(folder / "cache")).load()
    assert_samples(table, EXPECTED)
    assert (
        table[-1]["id"] == "last" and len(LlavaJson(path, limit=2, cache_dir=str(folder / "c2")).load()) == 2
    )
    with pytest.raises(IndexError):
        table[len(EXPECTED)]


def test_parallel_checking_gives_the_same_table_and_the_first_bad_record(folder):
    records = [{**RECORDS[i % 4], "id": f"r{i}"} for i in range(40)]
    path = write(folder, records, "json")
    serial = LlavaJson(path, cache_dir=str(folder / "one"), num_proc=1).load()
    parallel = LlavaJson(path, cache_dir=str(folder / "two"), num_proc=2).load()
    assert [parallel[i]["messages"] for i in range(40)] == [serial[i]["messages"] for i in range(40)]
    assert [parallel[i]["id"] for i in range(40)] == [f"r{i}" for i in range(40)]
    # Two bad records, one in each worker's half: the error names the first, as a sequential check would.
    records[13] = {**records[13], "image": "gone.png"}
    records[31] = {"id": "x", "conversations": []}
    path = write(folder, records, "json", name="bad")
    with pytest.raises(DataError) as info:
        LlavaJson(path, cache_dir=str(folder / "three"), num_proc=2).load()
    message = str(info.value)
    assert f"{path} record 13" in message and "gone.png" in message and "\n" not in message


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ({"conversations": [{"from": "human", "value": "q"}]}, "no answer"),
        ({"conversations": [{"speaker": "x"}, {"from": "gpt", "value": "a"}]}, "needs 'from'"),
        (
            {"image": {"path": "a.png"}, "conversations": RECORDS[2]["conversations"]},
            "'image' must be a path",
        ),
        (["not", "an", "object"], "must be a JSON object"),
    ],
)
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_a_malformed_record_is_one_line_naming_file_and_record(folder, bad, words, fmt):
    path = write(folder, [RECORDS[0], RECORDS[1], bad, RECORDS[2]], fmt)
    with pytest.raises(DataError) as info:
        LlavaJson(path, cache_dir=str(folder / "cache")).load()
    message = str(info.value)
    where = f"{path}:3" if fmt == "jsonl" else f"{path} record 2"
    assert message.startswith(where) and words in message and "\n" not in message
    assert not list((folder / "cache").glob("llava/*/"))  # nothing cached (nor left behind) for it


@pytest.mark.parametrize(
    ("text", "line", "msg"),
    [
        ('[\n  {"id": 1},\n  {"id": oops}\n]\n', 3, "Expecting value"),
        ('[\n  {"id": 1}\n  {"id": 2}\n]', 3, "Expecting ',' delimiter"),
        ('[\n  {"id": 1,\n   "x": "unterminated\n', 3, "Invalid control character"),
        ('[\n  {"id": 1}\n', 3, "Expecting ',' delimiter"),
        ('[{"id": 1}]\n\n]', 3, "Extra data"),
    ],
)
@pytest.mark.parametrize("chunk", [llava._CHUNK, 4])
def test_malformed_json_names_the_line_whatever_the_buffer(tmp_path, monkeypatch, text, line, msg, chunk):
    monkeypatch.setattr(llava, "_CHUNK", chunk)
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        list(llava.json_list_records(str(path), None))
    assert str(info.value).startswith(f"{path}:{line}: malformed JSON ({msg}")


def test_the_table_is_converted_once_per_file_version_and_a_damaged_entry_is_rebuilt(folder, monkeypatch):
    path = write(folder, RECORDS, "jsonl")
    cache = folder / "cache"
    conversions = []
    real = llava.convert
    monkeypatch.setattr(llava, "convert", lambda *a: conversions.append(1) or real(*a))
    LlavaJson(path, cache_dir=str(cache)).load()
    LlavaJson(path, cache_dir=str(cache)).load()  # a second rank, worker or run: memory-maps the entry
    assert len(conversions) == 1
    (entry,) = [p for p in (cache / "llava").iterdir() if p.is_dir()]
    (arrow,) = [p for p in entry.rglob("*.arrow")]
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])  # a copy that stopped half way
    with pytest.warns(UserWarning, match=r"damaged \(.*bytes.*\); rebuilding it"):
        table = LlavaJson(path, cache_dir=str(cache)).load()
    assert len(conversions) == 2
    assert_samples(table, EXPECTED)
    os.utime(path, ns=(1, 1))  # an edited file (new mtime) is converted again, under a new key
    LlavaJson(path, cache_dir=str(cache)).load()
    assert len(conversions) == 3 and len([p for p in (cache / "llava").iterdir() if p.is_dir()]) == 2


def test_tokens_view_opens_no_image(folder, monkeypatch):
    table = LlavaJson(write(folder, RECORDS, "json"), cache_dir=str(folder / "cache")).load()
    opened = []
    monkeypatch.setattr(llava, "open_image", lambda *a: opened.append(a))
    view = tokens_view(table, 1)
    assert view["messages"] == EXPECTED[1]["messages"] and opened == []
    assert all(isinstance(img, ImageRef) for img in view["images"])
    assert [img.size for img in view["images"]] == [(9, 7), (5, 11)]  # read from the headers on demand


def _load_in_child(path: str, cache: str, out: str) -> None:
    table = LlavaJson(path, cache_dir=cache).load()
    Path(out).write_text(json.dumps([table[i]["id"] for i in range(len(table))]))


def test_concurrent_processes_convert_once_and_share_the_entry(folder, monkeypatch):
    """Ranks start together: one converts, the others wait on the entry's lock and map its files."""
    import multiprocessing

    path, cache, log = write(folder, RECORDS * 50, "jsonl"), str(folder / "cache"), folder / "conversions"
    real = llava.convert

    def logged(*args):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return real(*args)

    monkeypatch.setattr(llava, "convert", logged)  # inherited by the forked processes
    ctx = multiprocessing.get_context("fork")
    children = [
        ctx.Process(target=_load_in_child, args=(path, cache, str(folder / f"ids{k}"))) for k in range(3)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    assert [child.exitcode for child in children] == [0, 0, 0]
    assert len(log.read_text().split()) == 1
    ids = [json.loads((folder / f"ids{k}").read_text()) for k in range(3)]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 200 and ids[0][:4] == [e["id"] for e in EXPECTED]
