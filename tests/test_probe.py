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
