"""Batched greedy generation equals batch-1 generation on both families; stop strings; EMT labels.

Prompts differ a lot in length (a 1-turn and a 3-turn conversation) and in image size (Qwen2.5-VL
then gets a different number of image tokens), so left padding, the attention mask and the (M-)RoPE
positions all matter. Token ids are compared in float32 with SDPA.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mllm_cl.data.collate import Encoder
from mllm_cl.data.meta import prompt_labels
from mllm_cl.families import get_family
from mllm_cl.generation import cut_at_stop, generate, generate_ids
from mllm_cl.metrics import build_metric

N = 8


def _samples(n: int = N) -> list[dict]:
    out = []
    for i in range(n):
        image = Image.new("RGB", (32 + 16 * (i % 3), 32 + 16 * (i % 2)), ((60 * i) % 255, 90, 200 - 12 * i))
        if i % 2 == 0:
            messages = [{"role": "user", "content": "<image>\nHow many squares are in the image?"}]
        else:
            messages = [
                {"role": "user", "content": "<image>\nWhat colour is the square?"},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "How many circles are there in this picture?"},
                {"role": "assistant", "content": "three"},
                {"role": "user", "content": "Which shape is left?"},
            ]
        out.append({"id": str(i), "messages": messages, "images": [image], "answers": ["red"]})
    return out


def _new_ids(family, model, processor, samples, padding_side="left") -> list[list[int]]:
    enc = Encoder(family, processor)
    batch = enc.collate([enc.encode_prompt(s) for s in samples], padding_side=padding_side)
    with torch.no_grad():
        out = generate_ids(model, processor.tokenizer, family.end_of_turn, batch, max_new_tokens=10)
    new = out[:, batch["input_ids"].shape[1] :]
    return [row[row != processor.tokenizer.pad_token_id].tolist() for row in new]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_equals_batch_one(tiny, batch_size):
    family, model, processor = tiny
    model.eval()
    samples = _samples()
    one = [_new_ids(family, model, processor, [s])[0] for s in samples]
    batched = []
    for start in range(0, N, batch_size):
        batched += _new_ids(family, model, processor, samples[start : start + batch_size])
    assert batched == one
    # The prompts really differ: random tiny models still answer them differently.
    assert len({tuple(x) for x in one}) > 1


def test_right_padding_would_differ(tiny):
    """Control: the comparison above can fail (right padding puts pads between prompt and answer)."""
    family, model, processor = tiny
    model.eval()
    samples = _samples()
    one = [_new_ids(family, model, processor, [s])[0] for s in samples]
    assert _new_ids(family, model, processor, samples, padding_side="right") != one


def test_stop_strings_cut_and_stop_early(tiny_llava):
    family = get_family("llava")
    model, processor = tiny_llava
    model.eval()
    tok = processor.tokenizer
    enc = Encoder(family, processor)
    samples = _samples(2)
    one = enc.collate([enc.encode_prompt(samples[0])], padding_side="left")
    prompt_len = one["input_ids"].shape[1]
    free_ids = generate_ids(model, tok, family.end_of_turn, one, 12)[0, prompt_len:].tolist()
    assert len(free_ids) == 12  # the random model rambles on: only a stop string can end it early
    free = tok.decode(free_ids, skip_special_tokens=True)
    stop = free.split()[3]
    # By hand: the first prefix of the free answer whose text contains the stop string.
    k = next(k for k in range(1, 13) if stop in tok.decode(free_ids[:k], skip_special_tokens=True))
    assert k < 12
    ids = generate_ids(model, tok, family.end_of_turn, one, 12, stop=[stop])
    assert ids[0, prompt_len:].tolist() == free_ids[:k]  # ended right at the stop string
    assert generate(model, tok, family.end_of_turn, one, 12, stop=[stop]) == [free[: free.find(stop)].strip()]
    # In a batch every row is cut at its own first stop string (or left whole without one).
    batch = enc.collate([enc.encode_prompt(s) for s in samples], padding_side="left")
    frees = generate(model, tok, family.end_of_turn, batch, 12)
    cut = generate(model, tok, family.end_of_turn, batch, 12, stop=[stop])
    assert cut == [(f[: f.find(stop)] if stop in f else f).strip() for f in frees]
    assert cut[0] != frees[0] and stop not in cut[0]


def test_cut_at_stop():
    assert cut_at_stop("two. Because", [".", "\n"]) == "two"
    assert cut_at_stop("a\nb.c", [".", "\n"]) == "a"
    assert cut_at_stop("none here", ["###"]) == "none here"
    assert cut_at_stop("x", None) == "x"


def test_emt_labels_from_prompt_score_per_sample():
    q = "Which shape is this? Choose one of: circle, square, triangle."
    sample = {"messages": [{"role": "user", "content": "<image>\n" + q}]}
    labels = prompt_labels(sample)
    assert labels == ["circle", "square", "triangle"]
    assert prompt_labels({"labels": ["a", "b"], "messages": []}) == ["a", "b"]
    metric = build_metric("emt")
    # "The square is 8." names one label -> correct; naming two labels is unmatched -> wrong.
    metric.update(["The square is 8.", "square or circle"], [["square"], ["square"]], labels=[labels, labels])
    assert float(metric.compute()) == pytest.approx(0.5)


def test_generation_is_greedy_whatever_the_checkpoint_config_says():
    """A checkpoint's generation_config (sampling, repetition penalty, n-gram blocking, min length)
    must not change evaluation answers: they equal plain argmax decoding, computed here step by step."""
    family = get_family("llava")
    model, processor = family.build_tiny("tiny", seed=3)
    model.eval()
    enc = Encoder(family, processor)
    batch = enc.collate([enc.encode_prompt(s) for s in _samples(2)[:1]], padding_side="left")
    eos = family.end_of_turn
    # Reference: argmax of the next-token logits, one step at a time, with no processor at all.
    ids, mask = batch["input_ids"], batch["attention_mask"]
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "meta", "skipped")}
    want = []
    with torch.no_grad():
        for _ in range(6):
            logits = model(input_ids=ids, attention_mask=mask, **extra).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            want.append(int(nxt))
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    tok = processor.tokenizer
    eos_id = tok.convert_tokens_to_ids(eos)
    want = want[: want.index(eos_id) + 1] if eos_id in want else want
    cfg = model.generation_config
    cfg.do_sample, cfg.temperature, cfg.top_k = True, 5.0, 3
    cfg.repetition_penalty, cfg.no_repeat_ngram_size, cfg.min_new_tokens = 5.0, 1, 6
    with torch.no_grad():
        got = generate_ids(model, tok, eos, batch, max_new_tokens=6)[
            0, batch["input_ids"].shape[1] :
        ].tolist()
    assert got[: len(want)] == want
    # The tampered config does change HF's default decoding: the overrides are what keep it greedy.
    torch.manual_seed(0)
    with torch.no_grad():
        plain = model.generate(
            **{k: v for k, v in batch.items() if k not in ("meta", "skipped")}, max_new_tokens=6
        )
    assert plain[0, batch["input_ids"].shape[1] :].tolist()[: len(want)] != want
