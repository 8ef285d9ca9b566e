"""Counting-bias probe: the number-token set, the per-step statistics, and the live monitor in a real fit."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mllm_cl.cli import main
from mllm_cl.data.collate import Encoder
from mllm_cl.module import MLLMModule
from mllm_cl.probe import is_number_token, number_token_ids, probe
from tests.helpers import ROOT

# Written out by hand (not imported from mllm_cl.probe) so the test checks the definition (LMM_CL's set).
WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand "
    "million billion"
).split()
ORDINALS = "first second third fourth fifth sixth seventh eighth ninth tenth".split()


@pytest.mark.parametrize(
    "token,expected",
    [
        ("7", True),
        ("Ġ42", True),
        ("▁2024", True),
        ("3.5", True),
        ("Ġ.5", False),  # upstream: a decimal starts and ends with a digit
        ("5.", False),
        ("3,000", True),  # upstream: one comma between digits
        ("1st", True),
        ("▁22nd", True),
        ("Ġ1st", True),
        ("Ġtwenty", True),
        ("ĠTwenty", True),  # upstream misses this one (lower() turns Ġ into ġ); we do not
        ("Hundred", True),
        ("▁billion", True),
        ("third", False),  # word ordinals: off by default (not in upstream's set)
        ("Ġfirst", False),
        ("Ġ", False),
        ("▁", False),
        ("Ġ12a", False),
        ("1.2.3", False),
        ("٣", False),
        ("twentyone", False),
        ("square", False),
        ("Ġone-", False),
        ("3,000,000", False),
        ("st", False),
    ],
)
def test_is_number_token(token, expected):
    assert is_number_token(token) is expected


def test_word_ordinals_are_optional():
    for word in ("third", "Ġfirst", "▁Twentieth"):
        assert not is_number_token(word) and is_number_token(word, ordinals=True)
    assert is_number_token("Ġ7", ordinals=True) and not is_number_token("square", ordinals=True)


def test_number_tokens_of_tiny_tokenizers(tiny):
    _, _, processor = tiny
    tok = processor.tokenizer
    vocab = tok.get_vocab()
    want = {i for w, i in vocab.items() if (w.isdigit() and w.isascii()) or w in WORDS}
    got = number_token_ids(tok)
    assert set(got) == want and len(got) == len(want)
    ordinal_ids = {vocab[w] for w in ORDINALS if w in vocab}
    assert set(number_token_ids(tok, ordinals=True)) == want | ordinal_ids
    assert vocab["100"] in got and vocab["twenty"] in got and vocab["square"] not in got
    assert not set(got) & set(tok.all_special_ids)


def _trained(pre, dec, corpus, specials):
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer, tok.decoder = pre, dec
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0])


CORPUS = ["there are 12 cats and twenty dogs in 2024 and one hundred birds"] * 50 + [
    "squares 12 12 twenty one"
] * 50


def test_byte_level_bpe_number_tokens():
    tok = _trained(pre_tokenizers.ByteLevel(add_prefix_space=True), decoders.ByteLevel(), CORPUS, ["<|end|>"])
    vocab = tok.get_vocab()
    ids = set(number_token_ids(tok))
    for piece in ("Ġ12", "Ġtwenty", "Ġhundred", "Ġone"):
        assert piece in vocab and vocab[piece] in ids, piece
    for piece in ("Ġcats", "Ġsquares", "<|end|>"):
        assert vocab[piece] not in ids, piece
    assert {vocab[t] for t in vocab if t.lstrip("Ġ").isdigit()} <= ids


def test_sentencepiece_like_number_tokens():
    tok = _trained(pre_tokenizers.Metaspace(), decoders.Metaspace(), CORPUS, ["</s>"])
    vocab = tok.get_vocab()
    ids = set(number_token_ids(tok))
    assert vocab["▁12"] in ids and vocab["▁twenty"] in ids and vocab["▁cats"] not in ids
    assert vocab["</s>"] not in ids


def test_number_mass_equals_softmax_by_hand():
    module = MLLMModule(family="llava", tiny="tiny")
    module.configure_model()
    module.model.eval()
    sample = {
        "id": "a",
        "images": [__import__("PIL.Image").Image.new("RGB", (32, 32), (200, 10, 10))],
        "messages": [{"role": "user", "content": "<image>\nHow many squares are in the image?"}],
        "answers": ["1"],
    }
    stats = probe(module, [sample], max_new_tokens=1)
    enc = Encoder(module.family, module.processor)
    batch = enc.collate([enc.encode_prompt(sample)], padding_side="left")
    with torch.no_grad():
        logits = module(batch).logits[0, -1].double()
    ids = number_token_ids(module.processor.tokenizer)
    probs = torch.softmax(logits, -1)
    assert stats["number_mass"] == pytest.approx(float(probs[ids].sum()), rel=1e-4)
    assert stats["max_number_prob"] == pytest.approx(float(probs[ids].max()), rel=1e-4)
    assert stats["max_number_logit"] == pytest.approx(float(logits[ids].max()), rel=1e-4)
    assert stats["number_mass_std"] == 0.0 and stats["n"] == 1


def _sample(i: int, question: str, colour: tuple[int, int, int]) -> dict:
    image = Image.new("RGB", (32, 32), colour)
    return {"id": str(i), "images": [image], "messages": [{"role": "user", "content": "<image>\n" + question}],
            "answers": ["1"]}  # fmt: skip


def _by_hand(
    module, sample: dict, number_ids: list[int], eos: int, steps: int
) -> tuple[list[dict], list[int]]:
    """Greedy decoding of one prompt alone (no padding, no cache): per step, the statistics of the raw
    next-token logits, up to and including the end-of-turn token; and the tokens chosen."""
    enc = Encoder(module.family, module.processor)
    batch = enc.collate([enc.encode_prompt(sample)])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    images = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "meta", "skipped")}
    rows, tokens = [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = module.model(input_ids=ids, attention_mask=mask, **images).logits[0, -1].double()
            probs = torch.softmax(logits, -1)
            rows.append({"number_mass": float(probs[number_ids].sum()),
                         "max_number_prob": float(probs[number_ids].max()),
                         "max_number_logit": float(logits[number_ids].max())})  # fmt: skip
            tokens.append(int(logits.argmax()))
            if tokens[-1] == eos:
                break
            ids, mask = torch.cat([ids, torch.tensor([[tokens[-1]]])], 1), torch.cat([mask, mask[:, :1]], 1)
    return rows, tokens


def test_probe_over_prompts_of_different_lengths():
    """A short prompt that ends early and a long one that runs the whole budget, probed in one
    left-padded batch: each sample is averaged over its own steps through its end token, and the
    batch gives what each prompt gives alone."""
    module = MLLMModule(family="llava", tiny="tiny")
    module.configure_model()
    module.model.eval()
    tok = module.processor.tokenizer
    eos = tok.convert_tokens_to_ids(module.family.end_of_turn)
    vocab = tok.get_vocab()
    number_ids = sorted(i for w, i in vocab.items() if (w.isdigit() and w.isascii()) or w in WORDS)
    short = _sample(0, "How many squares are in the image?", (200, 10, 10))
    long = _sample(1, "What colour is the circle left of the big red square in this picture?", (10, 200, 10))
    enc = Encoder(module.family, module.processor)
    assert enc.encode_prompt(short)["input_ids"].shape[1] < enc.encode_prompt(long)["input_ids"].shape[1]
    # Make the short answer end at its 3rd token: the end token's output row becomes a slightly longer
    # copy of that token's row, so it wins where that token would.
    _, tokens = _by_hand(module, short, number_ids, eos, 6)
    with torch.no_grad():
        module.model.lm_head.weight[eos] = 1.05 * module.model.lm_head.weight[tokens[2]]
    want = [_by_hand(module, s, number_ids, eos, 6) for s in (short, long)]
    assert [w[1][-1] == eos for w in want] == [True, False]
    assert [len(w[0]) for w in want] == [3, 6]  # the short answer ends early, the long one does not
    means = [{k: sum(step[k] for step in rows) / len(rows) for k in rows[0]} for rows, _ in want]

    got = probe(module, [short, long], batch_size=2, max_new_tokens=6)
    assert got["n"] == 2
    for key in means[0]:
        values = [m[key] for m in means]
        mean = sum(values) / 2
        std = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5  # population std, ddof = 0
        assert got[key] == pytest.approx(mean, rel=1e-4), key
        assert got[f"{key}_std"] == pytest.approx(std, rel=1e-3, abs=1e-7), key
    assert got["number_mass_std"] > 1e-4  # two different samples: the spread is not trivially zero


def test_monitor_probes_named_sets_side_by_side_on_a_log_spaced_schedule(tmp_path):
    extra = tmp_path / "probe.yaml"
    extra.write_text(
        "trainer:\n  callbacks:\n    - class_path: mllm_cl.monitor.CountingBiasProbe\n      init_args:\n"
        "        probe_sets:\n"
        "          counting: {class_path: Synthetic, init_args: {skill: count, n: 8, seed: 6, image_size: 32}}\n"
        "          caption: {class_path: Synthetic, init_args: {skill: shape, n: 8, seed: 7, image_size: 32}}\n"
        "        heldout_set: {class_path: Synthetic, init_args: {skill: count, n: 8, seed: 8, image_size: 32}}\n"
        "        every_n_steps: 3\n        log_spaced: true\n        limit: 4\n        max_new_tokens: 3\n"
    )
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "tiny_llava_test.yaml"),
            "--config",
            str(extra),
            "--data.eval_limit",
            "4",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"),
        ]
    )
    (run,) = list((tmp_path / "runs").glob("*/version_*"))
    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("counting", "caption"):
        for stat in ("number_mass", "max_number_prob", "max_number_logit"):
            assert f"probe/{name}/{stat}" in tags, (name, stat)
    assert "probe/heldout_acc" in tags and "probe/number_mass" not in tags
    # base (0); step 1 of each task (log-spaced: global 1 and 6); every 3 steps (3, 6, 9); task ends (5, 10).
    for name in ("counting", "caption"):
        assert sorted(e.step for e in events.Scalars(f"probe/{name}/number_mass")) == [0, 1, 3, 5, 6, 9, 10]
        assert all(0.0 <= e.value <= 1.0 for e in events.Scalars(f"probe/{name}/number_mass"))
    records = [json.loads(line) for line in (run / "probe.jsonl").read_text().splitlines()]  # one file
    assert [r["label"] for r in records if r["label"] != "step"] == ["base", "after_count", "after_colour"]
    # global steps 1, 3, 6 (both schedules: measured once), 9
    assert [r["task_step"] for r in records if r["label"] == "step"] == [1, 3, 1, 4]
    for r in records:
        assert set(r["sets"]) == {"counting", "caption"} and r["sets"]["counting"]["n"] == 4
        assert r["probe/caption/number_mass"] == r["sets"]["caption"]["number_mass"]


def test_log_spaced_steps_and_the_legacy_single_probe_set():
    from mllm_cl.data import Synthetic
    from mllm_cl.errors import ConfigError
    from mllm_cl.monitor import CountingBiasProbe, log_spaced

    assert [s for s in range(1, 2001) if log_spaced(s)] == [1, 10, 100, 1000]
    one = CountingBiasProbe(probe_set=Synthetic("shape", n=2, seed=1, image_size=32))
    assert list(one.sets) == ["default"] and one.max_new_tokens == 256 and one.ordinals is False
    with pytest.raises(ConfigError, match="probe_sets"):
        CountingBiasProbe()


def test_probe_subcommand_over_saved_checkpoints(tmp_path, capsys):
    from mllm_cl.data import Synthetic
    from strategies.freeze import SAProj
    from tests.helpers import fit_cli, write_config

    shape = {"class_path": "Synthetic", "init_args": {"skill": "shape", "n": 4, "seed": 5, "image_size": 32}}
    count = {"class_path": "Synthetic", "init_args": {"skill": "count", "n": 8, "seed": 1, "image_size": 32}}
    model = {"family": "llava", "tiny": "tiny", "recipe": {"class_path": "SAProj"}, "lr": 1e-2}
    data = {
        "batch_size": 4,
        "eval_limit": 2,
        "tasks": [{"name": "count", "train": count, "steps": 3}],
        "heldout": [{"name": "shape", "data": shape}],
    }
    run_dir, _ = fit_cli(tmp_path, "run", model, data)
    config, ckpt, out = (
        write_config(tmp_path, "run", model, data),
        run_dir / "checkpoints" / "last.ckpt",
        tmp_path / "p.jsonl",
    )
    args = ["probe", "--config", str(config), "--base", "--ckpt_path", str(ckpt), "--sets", "shape"]
    with pytest.raises(SystemExit) as done:
        main([*args, "--limit", "2", "--max_new_tokens", "3", "--out", str(out)])
    assert done.value.code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["checkpoint"] for r in records] == ["base", str(ckpt)] and all(
        set(r["sets"]) == {"shape"} for r in records
    )

    # The same numbers by hand: the tiny model of the config, with and without the checkpoint's weights.
    samples = Synthetic("shape", n=4, seed=5, image_size=32).load()
    samples = [samples[i] for i in range(2)]
    module = MLLMModule(family="llava", tiny="tiny", recipe=SAProj())
    module.configure_model()
    base = probe(module, samples, max_new_tokens=3)
    module.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"], strict=False)
    trained = probe(module, samples, max_new_tokens=3)
    for record, want in zip(records, (base, trained), strict=True):
        for key in ("number_mass", "max_number_prob", "max_number_logit"):
            assert record["sets"]["shape"][key] == pytest.approx(want[key], rel=1e-5), key
    assert records[0]["sets"]["shape"]["max_number_logit"] != records[1]["sets"]["shape"]["max_number_logit"]

    with pytest.raises(SystemExit) as bad:
        main(["probe", "--config", str(config), "--base", "--sets", "nope"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (progress bars of the data cache above it)
    assert bad.value.code == 2 and err.startswith("error: probe --sets") and "nope" in err and "shape" in err
