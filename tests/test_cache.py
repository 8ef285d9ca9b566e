"""data.cache_processed: tokenised training data cached with `datasets`, read back without re-tokenising."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mllm_cl.cli import main
from mllm_cl.data import LlavaJson, Synthetic
from mllm_cl.data.cache import tokenized
from mllm_cl.data.collate import Encoder
from mllm_cl.errors import DataError
from tests.helpers import fit_cli, write_config


def sample(images: int, turns: int = 1) -> dict:
    messages = []
    for k in range(turns):
        messages += [
            {"role": "user", "content": "<image>\n" * images * (k == 0) + f"What colour is shape {k}?"},
            {"role": "assistant", "content": "the square is red" if k % 2 else "blue"},
        ]
    pics = [Image.new("RGB", (32 + 16 * i, 32), (220, 30 * i, 30)) for i in range(images)]
    return {"id": "s", "images": pics, "messages": messages, "answers": ["x"]}


def assert_same_encoding(got: dict | None, want: dict | None) -> None:
    if want is None:
        assert got is None
        return
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype, key
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("overlength", ["skip", "truncate"])
def test_a_record_rebuilds_exactly_what_encoding_gives(tiny, overlength):
    family, _, processor = tiny
    full = Encoder(family, processor)
    cases = [sample(0), sample(1), sample(2, turns=2), sample(1, turns=6)]
    lengths = [len(full.encode_train(c)["input_ids"][0]) for c in cases]
    # The longest sample is cut inside its last answer: truncated under "truncate", skipped under "skip".
    encoder = Encoder(family, processor, max_length=max(lengths) - 2, overlength=overlength)
    over = [n > max(lengths) - 2 for n in lengths]
    truncated = 0
    for case in cases:
        record = encoder.record(case)
        want = encoder.encode_train(case)
        assert_same_encoding(encoder.encode_train({**case, "_tokens": record}), want)
        truncated += record["truncated"]
        if case["images"] and not record["skip"]:
            # Each image's run of tokens is stored as one id plus its length.
            assert len(record["ids"]) == len(want["input_ids"][0]) - sum(record["image_runs"]) + len(
                record["image_runs"]
            )
            assert len(record["image_runs"]) >= 1 and min(record["image_runs"]) > 1
        prompt = encoder.record(case, prompt=True)  # eval sets: the generation prompt, no labels
        assert prompt["labels"] == [] and not prompt["skip"]
        assert_same_encoding(encoder.encode_prompt({**case, "_tokens": prompt}), encoder.encode_prompt(case))
    assert sum(over) == 1 and truncated == (overlength == "truncate")
    assert [encoder.record(c)["skip"] for c in cases] == [o and overlength == "skip" for o in over]


def count_calls(monkeypatch, *names: str) -> list:
    """The real `Encoder._labels` (tokenise and align labels), or the Encoder methods named (e.g. the
    processor call `_process` and its text-only twin `_process_tokens`), with one call counter."""
    calls = []
    for name in names or ("_labels",):
        real = getattr(Encoder, name)

        def counted(self, *args, _real=real):
            calls.append(1)
            return _real(self, *args)

        monkeypatch.setattr(Encoder, name, counted)
    return calls


TOKENISE = ("_process", "_process_tokens")  # every way a sample's text is tokenised


def test_second_use_reads_the_cache_and_keys_follow_what_tokens_depend_on(tmp_path, monkeypatch, tiny_llava):
    from mllm_cl.families import get_family

    family, (_, processor) = get_family("llava"), tiny_llava
    table = Synthetic("colour", n=6, seed=5, image_size=32).load()
    encoder = Encoder(family, processor, max_length=64, overlength="truncate")
    calls = count_calls(monkeypatch)

    first = tokenized(table, encoder, tmp_path)
    assert len(calls) == 6  # built once
    folders = sorted(p.name for p in tmp_path.iterdir())
    again = tokenized(table, encoder, tmp_path)
    assert len(calls) == 6 and sorted(p.name for p in tmp_path.iterdir()) == folders
    for i in range(6):
        assert first[i]["_tokens"] == again[i]["_tokens"]
        assert_same_encoding(
            encoder.encode_train(again[i]), Encoder(family, processor, 64, "truncate").encode_train(table[i])
        )
    assert len(calls) == 6 + 6  # only the reference encodings above aligned labels

    tokenized(table, Encoder(family, processor, max_length=32, overlength="truncate"), tmp_path)
    other_data = Synthetic("colour", n=6, seed=6, image_size=32).load()
    tokenized(other_data, encoder, tmp_path)
    assert len({p.name for p in tmp_path.iterdir()}) == len(folders) + 2
    assert all(not p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folders left behind


def test_an_edited_annotation_file_gets_a_new_cache_entry(tmp_path, tiny_llava):
    from mllm_cl.families import get_family

    Image.new("RGB", (32, 32), (0, 0, 200)).save(tmp_path / "a.png")
    path = tmp_path / "train.json"
    record = {"id": 1, "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                          {"from": "gpt", "value": "blue"}]}  # fmt: skip
    path.write_text(json.dumps([record]))
    encoder = Encoder(get_family("llava"), tiny_llava[1])
    cache = tmp_path / "cache"
    before = tokenized(LlavaJson(str(path)).load(), encoder, cache)
    record["conversations"][1]["value"] = "red"
    path.write_text(json.dumps([record, record]))
    after = tokenized(LlavaJson(str(path)).load(), encoder, cache)
    assert len(list(cache.iterdir())) == 2
    assert len(after) == 2 and after[0]["_tokens"]["labels"] != before[0]["_tokens"]["labels"]


def test_a_table_without_fingerprint_is_encoded_on_the_fly_and_errors_stay_one_line(tmp_path, tiny_llava):
    from mllm_cl.families import get_family

    encoder = Encoder(get_family("llava"), tiny_llava[1], max_length=8, overlength="error")
    plain = [sample(1)]
    assert tokenized(plain, encoder, tmp_path) is plain
    table = Synthetic("colour", n=3, seed=5, image_size=32).load()
    with pytest.raises(DataError, match="max_length=8") as err:
        tokenized(table, encoder, tmp_path, num_workers=1)
    assert "\n" not in str(err.value) and not any(tmp_path.iterdir())


def fit_args(tmp: Path, cache: bool) -> tuple[dict, dict]:
    task = {"class_path": "Synthetic", "init_args": {"skill": "colour", "n": 8, "seed": 3, "image_size": 32}}
    hybrid = {"class_path": "DataHybrid",
              "init_args": {"sources": [{**task, "init_args": {**task["init_args"], "skill": "shape"}}],
                            "ratios": [0.5]}}  # fmt: skip
    evalset = {**task, "init_args": {**task["init_args"], "n": 6, "seed": 4}}
    model = {"family": "llava", "recipe": {"class_path": "Full"}, "lr": 3e-3, "max_new_tokens": 2,
             "strategies": [hybrid]}  # fmt: skip
    data = {"batch_size": 4, "cache_processed": cache, "cache_dir": str(tmp / "cache"),
            "tasks": [{"name": "c", "train": task, "steps": 4, "eval": evalset}]}  # fmt: skip
    return model, data


def fit(tmp: Path, name: str, cache: bool) -> dict:
    return fit_cli(tmp, name, *fit_args(tmp, cache))[1]


def test_fit_with_the_cache_trains_identically_and_the_second_run_does_not_retokenise(tmp_path, monkeypatch):
    plain = fit(tmp_path, "plain", cache=False)
    labels, processed = count_calls(monkeypatch), count_calls(monkeypatch, *TOKENISE)
    first = fit(tmp_path, "first", cache=True)
    built = len(labels)
    assert built == 16  # the task's 8 samples and the hybrid source's 8, tokenised once into the cache
    assert len(processed) == 16 + 6  # and the 6 eval prompts
    second = fit(tmp_path, "second", cache=True)
    assert len(labels) == built and len(processed) == 16 + 6  # nothing tokenised again: train nor eval
    assert len(list((tmp_path / "cache").iterdir())) == 3
    assert plain.keys() == first.keys() == second.keys() and plain
    assert all(torch.equal(plain[k], first[k]) and torch.equal(plain[k], second[k]) for k in plain)


def test_cache_subcommand_prebuilds_everything_a_fit_then_reads(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, "run", *fit_args(tmp_path, cache=False))  # the command turns it on
    with pytest.raises(SystemExit) as done:
        main(["cache", "--config", str(config)])
    assert done.value.code == 0
    assert "3 of 3 tables cached" in capsys.readouterr().out  # task, eval set, DataHybrid source
    assert len(list((tmp_path / "cache").iterdir())) == 3
    processed = count_calls(monkeypatch, *TOKENISE)
    main(["fit", "--config", str(config), "--data.cache_processed", "true"])
    assert processed == []  # the fit tokenised nothing
    with pytest.raises(SystemExit) as bad:
        main(["cache", "--config", str(tmp_path / "missing.yaml")])
    assert bad.value.code == 2 and "missing.yaml" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_damaged_entry_is_detected_rebuilt_and_reported(tmp_path, monkeypatch, tiny_llava):
    from mllm_cl.families import get_family

    table = Synthetic("colour", n=6, seed=5, image_size=32).load()
    encoder = Encoder(get_family("llava"), tiny_llava[1], max_length=64, overlength="truncate")
    calls = count_calls(monkeypatch)
    first = tokenized(table, encoder, tmp_path)
    tokens = [first[i]["_tokens"] for i in range(6)]
    (entry,) = tmp_path.iterdir()
    (arrow,) = entry.rglob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:-40])  # a write that never finished
    with pytest.warns(UserWarning, match=r"damaged \(.*bytes.*\); rebuilding it"):
        again = tokenized(table, encoder, tmp_path)
    assert len(calls) == 12 and [again[i]["_tokens"] for i in range(6)] == tokens
    (entry / "mllm_cl_entry.json").unlink()  # half deleted
    with pytest.warns(UserWarning, match="no readable manifest"):
        tokenized(table, encoder, tmp_path)
    assert len(calls) == 18 and [p.name for p in tmp_path.iterdir()] == [entry.name]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_building_reads_no_pixels_and_qwen_only_image_sizes(tmp_path, monkeypatch, capfd, family):
    from mllm_cl.families import get_family

    sizes = [(40, 24), (24, 56), (64, 64), (30, 30)]
    for k, size in enumerate(sizes):
        Image.new("RGB", size, (200, 10 * k, 10)).save(tmp_path / f"{k}.png")
    records = [{"id": k, "image": f"{k}.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                                {"from": "gpt", "value": "red"}]} for k in range(4)]  # fmt: skip
    (tmp_path / "d.json").write_text(json.dumps(records))
    table = LlavaJson(str(tmp_path / "d.json"), cache_dir=str(tmp_path / "conv")).load()
    fam = get_family(family)
    encoder = Encoder(fam, fam.tiny_processor("tiny"))
    want = [encoder.encode_train(table[k]) for k in range(4)]  # the processor, on the decoded images
    processed = count_calls(monkeypatch, "_process")
    cached = tokenized(table, encoder, tmp_path / "cache", where="d.json")
    assert processed == []  # no image processed while building
    for k in range(4):
        assert_same_encoding(encoder.encode_train(cached[k]), want[k])
    err = capfd.readouterr().err  # the build's progress bar
    assert "tokenising d.json (text only)" in err and "samples/s" in err
    # Pixels are never read: LLaVA-1.5 does not open the images at all, Qwen2.5-VL reads their headers.
    for k in range(4):
        (tmp_path / f"{k}.png").write_bytes(b"not an image")
    other = Encoder(fam, fam.tiny_processor("tiny"), max_length=100)  # a new cache key: built again
    if family == "llava":
        assert len(tokenized(table, other, tmp_path / "cache")) == 4
    else:
        with pytest.raises(DataError, match=r"d.json record 0: image .*0.png cannot be read"):
            tokenized(table, other, tmp_path / "cache")
