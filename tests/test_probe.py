"""Counting-bias probe: the number-token set, the per-step statistics, and the live monitor in a real fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mllm_cl.cli import main
from mllm_cl.data.collate import Encoder
from mllm_cl.module import MLLMModule
from mllm_cl.probe import is_number_token, number_token_ids, probe

ROOT = Path(__file__).resolve().parent.parent
# Written out by hand (not imported from mllm_cl.probe) so the test checks the definition.
WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand "
    "million billion first second third fourth fifth sixth seventh eighth ninth tenth"
).split()


@pytest.mark.parametrize(
    "token,expected",
    [
        ("7", True),
        ("Ġ42", True),
        ("▁2024", True),
        ("3.5", True),
        ("Ġ.5", True),
        ("1st", True),
        ("▁22nd", True),
        ("Ġtwenty", True),
        ("Hundred", True),
        ("▁billion", True),
        ("third", True),
        ("Ġ", False),
        ("▁", False),
        ("Ġ12a", False),
        ("1.2.3", False),
        ("٣", False),
        ("twentyone", False),
        ("square", False),
        ("Ġone-", False),
        ("3,000", False),
        ("st", False),
    ],
)
def test_is_number_token(token, expected):
    assert is_number_token(token) is expected


def test_number_tokens_of_tiny_tokenizers(tiny):
    _, _, processor = tiny
    tok = processor.tokenizer
    vocab = tok.get_vocab()
    want = {i for w, i in vocab.items() if (w.isdigit() and w.isascii()) or w in WORDS}
    got = number_token_ids(tok)
    assert set(got) == want and len(got) == len(want)
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
    two = probe(module, [sample, sample], max_new_tokens=4)
    assert two["number_mass_std"] == pytest.approx(0.0, abs=1e-6) and 0 < two["number_mass"] < 1


def test_monitor_writes_tensorboard_scalars(tmp_path):
    extra = tmp_path / "probe.yaml"
    extra.write_text(
        "trainer:\n  callbacks:\n    - class_path: mllm_cl.monitor.CountingBiasProbe\n      init_args:\n"
        "        probe_set: {class_path: Synthetic, init_args: {skill: shape, n: 8, seed: 7, image_size: 32}}\n"
        "        heldout_set: {class_path: Synthetic, init_args: {skill: count, n: 8, seed: 8, image_size: 32}}\n"
        "        every_n_steps: 3\n        limit: 8\n        max_new_tokens: 3\n"
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
    for tag in ("probe/number_mass", "probe/max_number_prob", "probe/max_number_logit", "probe/heldout_acc"):
        assert tag in tags, tag
    # base (0), every 3 steps (3, 6, 9), task ends (5, 10): 5 steps per task, two tasks.
    assert sorted(e.step for e in events.Scalars("probe/number_mass")) == [0, 3, 5, 6, 9, 10]
    assert all(0.0 <= e.value <= 1.0 for e in events.Scalars("probe/number_mass"))
    records = [json.loads(line) for line in (run / "probe.jsonl").read_text().splitlines()]
    assert [r["label"] for r in records if r["label"] != "step"] == ["base", "after_count", "after_colour"]
