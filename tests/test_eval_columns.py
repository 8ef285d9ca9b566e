"""Eval columns scored by a real tiny LLaVA: per-set generation options, and an uneven split over ranks.

Expected answers come from generating each prompt on its own with the stock HF `generate` (plain
greedy, one prompt, no padding) and cutting the text by hand, not from the evaluation code.
"""

from __future__ import annotations

import pytest
import torch

from mllm_cl.data import Mix, Synthetic, Task, TaskStream
from mllm_cl.data.collate import Encoder
from mllm_cl.data.stream import EvalSet
from mllm_cl.evaluation import ColumnScorer, evaluate
from mllm_cl.module import MLLMModule

DEFAULT_TOKENS = 8  # model.max_new_tokens


def source(n: int) -> Mix:
    """Count questions, then colour questions: prompts of two lengths, so eval batches are left-padded."""
    count = Synthetic("count", n=n - n // 2, seed=5, image_size=32)
    return Mix([count, Synthetic("colour", n=n // 2, seed=6, image_size=32)])


@pytest.fixture(scope="module")
def module():
    module = MLLMModule(family="llava", tiny="tiny", max_new_tokens=DEFAULT_TOKENS)
    module.configure_model()
    module.model.eval()
    return module


def stream_of(module, heldout: list[EvalSet], **kwargs) -> TaskStream:
    stream = TaskStream(tasks=[Task("t", train=Synthetic("count", n=2, seed=1))], heldout=heldout, **kwargs)
    stream.prepare_tables(module, "validate")
    return stream


def alone(module, sample: dict, max_new_tokens: int) -> list[int]:
    """New token ids of plain greedy HF generation on this one prompt (no stop strings, no padding)."""
    encoder = Encoder(module.family, module.processor)
    batch = encoder.collate([encoder.encode_prompt(sample)])
    inputs = {k: v for k, v in batch.items() if k not in ("meta", "skipped", "truncated")}
    tok = module.processor.tokenizer
    with torch.no_grad():
        out = module.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.convert_tokens_to_ids(module.family.end_of_turn),
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_each_eval_set_uses_its_own_max_new_tokens_and_stop(module):
    tok = module.processor.tokenizer
    samples = source(4).load()
    samples = [samples[i] for i in range(4)]
    free = [alone(module, s, DEFAULT_TOKENS) for s in samples]
    assert all(len(ids) == DEFAULT_TOKENS for ids in free)  # the random model never ends by itself
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in free]
    encoder = Encoder(module.family, module.processor)
    lengths = {encoder.encode_prompt(s)["input_ids"].shape[1] for s in samples}
    assert len(lengths) == 2  # two prompt lengths in one batch of 4
    stop = texts[0].split()[2]  # a word the first answer reaches after two words
    stream = stream_of(
        module,
        [
            EvalSet("free", source(4)),
            EvalSet("short", source(4), max_new_tokens=2),
            EvalSet("stopped", source(4), stop=[stop]),
        ],
        eval_batch_size=4,
    )
    results = evaluate(module, stream.columns, lambda c: stream.eval_loader(c))
    got = {name: [r["prediction"] for r in result.records] for name, result in results.items()}

    assert got["free"] == [t.strip() for t in texts]
    assert got["short"] == [tok.decode(ids[:2], skip_special_tokens=True).strip() for ids in free]
    assert got["short"] != got["free"]
    by_hand = [t[: t.find(stop)].strip() if stop in t else t.strip() for t in texts]
    assert got["stopped"] == by_hand and got["stopped"][0] != got["free"][0]
    assert all(stop not in p for p in got["stopped"])


def test_uneven_split_over_two_ranks_scores_every_sample_once(module):
    """5 samples over 2 ranks: rank 1 gets a padding row so both run 2 batches; it is never scored."""
    stream = stream_of(module, [EvalSet("odd", source(5), max_new_tokens=2)], eval_batch_size=2)
    ids = [source(5).load()[i]["id"] for i in range(5)]
    loaders = [list(stream.eval_loader(0, rank, 2)) for rank in (0, 1)]
    assert [len(batches) for batches in loaders] == [2, 2]
    metas = [[m for b in batches for m in b["meta"]] for batches in loaders]
    # Rank r takes samples r, r + 2, ... of the padded list of 6; the 6th row repeats sample 0.
    assert [m["id"] for m in metas[0]] == [ids[0], ids[2], ids[4]]
    assert [m["id"] for m in metas[1]] == [ids[1], ids[3], ids[0]]
    assert [m["weight"] for m in metas[0] + metas[1]] == [1, 1, 1, 1, 1, 0]

    scorers = [ColumnScorer(stream.columns[0]) for _ in (0, 1)]
    with torch.no_grad():
        for scorer, batches in zip(scorers, loaders, strict=True):
            for batch in batches:
                scorer.add(module, batch)
    results = [s.result() for s in scorers]
    assert [r.samples for r in results] == [3, 2]  # the padding row is in no metric state
    scored = [r["id"] for result in results for r in result.records]
    assert sorted(scored) == sorted(ids)  # every sample exactly once
    # The two ranks' sums give the one-process value: mean of the 5 per-sample scores.
    one = evaluate(module, stream.columns, lambda c: stream.eval_loader(c))["odd"]
    assert one.samples == 5 and [r["id"] for r in one.records] == ids
    correct = sum(float(s.metric.correct) for s in scorers)
    assert correct / 5 == pytest.approx(one.value) == pytest.approx(sum(r["score"] for r in one.records) / 5)
