"""Encoding and collation on the real tiny processors: answer-only labels, image tokens, padding."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mllm_cl.data.collate import IGNORE, Encoder
from mllm_cl.errors import DataError


def red_image(size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), (220, 30, 30))


def two_turn_sample() -> dict:
    # The first answer's words also occur in the prompt, so a label taken from the prompt shows.
    return {
        "id": "multi",
        "images": [red_image()],
        "messages": [
            {"role": "user", "content": "<image>\nIs the square red or blue?"},
            {"role": "assistant", "content": "the square is red"},
            {"role": "user", "content": "How many squares are there?"},
            {"role": "assistant", "content": "2"},
        ],
        "answers": ["2"],
    }


def one_turn_sample(question: str = "What colour is the square?", answer: str = "red") -> dict:
    return {
        "id": "one",
        "images": [red_image()],
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "answers": [answer],
    }


def expected_image_tokens(family, model, out) -> int:
    """Image tokens the processor must expand one image to, from the model config / grid."""
    if family.name == "llava":
        vision = model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2
    merge = model.config.vision_config.spatial_merge_size
    return int(out["image_grid_thw"].prod()) // merge**2


def test_labels_are_the_answers_and_end_of_turn_only(tiny):
    family, model, processor = tiny
    tok = processor.tokenizer
    out = Encoder(family, processor).encode_train(two_turn_sample())
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert ids.shape == labels.shape == out["attention_mask"][0].shape

    kept = labels != IGNORE
    assert torch.equal(labels[kept], ids[kept])  # labels are unshifted copies of the answer ids
    want = tok.tokenize("the square is red") + [family.end_of_turn] + tok.tokenize("2") + [family.end_of_turn]
    assert tok.convert_ids_to_tokens(labels[kept].tolist()) == want

    # Two runs of answer tokens, each right after an assistant header; everything else is ignored.
    positions = kept.nonzero().flatten().tolist()
    starts = [p for p in positions if p - 1 not in positions]
    assert len(starts) == 2
    header = ["assistant", ":"] if family.name == "llava" else ["<|im_start|>", "assistant"]
    tokens = tok.convert_ids_to_tokens(ids.tolist())
    assert all(tokens[s - 2 : s] == header for s in starts)
    image_id = family.image_token_id(processor)
    image_pos = ids == image_id
    assert int(image_pos.sum()) == expected_image_tokens(family, model, out)
    assert (labels[image_pos] == IGNORE).all()
    # The prompt (everything before the first answer token) is entirely ignored.
    first = int(kept.nonzero()[0])
    assert (labels[:first] == IGNORE).all() and first > int(image_pos.nonzero()[-1])

    # The real model accepts the encoding and the loss is finite.
    with torch.no_grad():
        loss = model(**out).loss
    assert torch.isfinite(loss)


def test_qwen_keeps_mm_token_type_ids_on_image_tokens(tiny_qwen):
    from mllm_cl.families import get_family

    family = get_family("qwen2_5_vl")
    model, processor = tiny_qwen
    out = Encoder(family, processor).encode_train(two_turn_sample())
    types = out["mm_token_type_ids"][0]
    assert types.shape == out["input_ids"][0].shape
    assert torch.equal(types != 0, out["input_ids"][0] == family.image_token_id(processor))


def test_prompt_is_the_training_prefix_without_the_answer(tiny):
    family, _, processor = tiny
    encoder = Encoder(family, processor)
    sample = one_turn_sample()
    train = encoder.encode_train(sample)["input_ids"][0].tolist()
    prompt = encoder.encode_prompt(sample)["input_ids"][0].tolist()
    assert train[: len(prompt)] == prompt
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens(train[len(prompt) :]) == ["red", family.end_of_turn]


def test_collate_pads_right_for_training_and_left_for_prompts(tiny):
    family, model, processor = tiny
    encoder = Encoder(family, processor)
    pad = processor.tokenizer.pad_token_id
    long, short = two_turn_sample(), one_turn_sample()
    items = [encoder.encode_train(long), encoder.encode_train(short)]
    n_long, n_short = items[0]["input_ids"].shape[1], items[1]["input_ids"].shape[1]
    assert n_long > n_short

    batch = encoder.collate(items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, n_long)
    assert int(batch["skipped"]) == 0
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(batch[key][1, :n_short], items[1][key][0])
        assert torch.equal(batch[key][0], items[0][key][0])
    assert (batch["input_ids"][1, n_short:] == pad).all()
    assert (batch["labels"][1, n_short:] == IGNORE).all()
    assert (batch["attention_mask"][1, n_short:] == 0).all()
    assert torch.equal(batch["pixel_values"], torch.cat([x["pixel_values"] for x in items]))
    if family.name == "qwen2_5_vl":
        assert batch["mm_token_type_ids"].shape == (2, n_long)
        assert (batch["mm_token_type_ids"][1, n_short:] == 0).all()
        assert batch["image_grid_thw"].shape == (2, 3)
    with torch.no_grad():
        assert torch.isfinite(model(**{k: v for k, v in batch.items() if k != "skipped"}).loss)

    prompts = [encoder.encode_prompt(long), encoder.encode_prompt(short)]
    p_long, p_short = prompts[0]["input_ids"].shape[1], prompts[1]["input_ids"].shape[1]
    left = encoder.collate(prompts, padding_side="left")
    assert "labels" not in left
    extra = p_long - p_short
    assert extra > 0
    assert (left["input_ids"][1, :extra] == pad).all()
    assert (left["attention_mask"][1, :extra] == 0).all()
    assert torch.equal(left["input_ids"][1, extra:], prompts[1]["input_ids"][0])
    assert torch.equal(left["attention_mask"][1, extra:], prompts[1]["attention_mask"][0])
    if family.name == "qwen2_5_vl":
        assert torch.equal(left["mm_token_type_ids"][1, extra:], prompts[1]["mm_token_type_ids"][0])


def test_placeholder_image_mismatch_and_missing_answer_raise_data_error(tiny):
    family, _, processor = tiny
    encoder = Encoder(family, processor)
    two_marks = one_turn_sample(question="<image> and <image>: what colour is the square?")
    with pytest.raises(DataError, match="2 <image> placeholders but 1 images"):
        encoder.encode_train(two_marks)
    no_answer = {
        "id": "q-only",
        "images": [red_image()],
        "messages": [{"role": "user", "content": "What colour?"}],
    }
    with pytest.raises(DataError, match="q-only.*no assistant answer"):
        encoder.encode_train(no_answer)


def test_overlength_skip_truncate_error(tiny):
    family, _, processor = tiny
    sample = one_turn_sample(question="What colour is the square in the image? Answer with one word.")
    full = Encoder(family, processor).encode_train(sample)
    ids, labels = full["input_ids"][0], full["labels"][0]
    n = ids.shape[0]
    last_image = int((ids == family.image_token_id(processor)).nonzero()[-1])
    cut = n - 1  # after the image and the answer word: only the end-of-turn token is lost

    assert Encoder(family, processor, max_length=cut, overlength="skip").encode_train(sample) is None
    with pytest.raises(DataError, match=f"{n} tokens > max_length={cut}"):
        Encoder(family, processor, max_length=cut, overlength="error").encode_train(sample)

    truncated = Encoder(family, processor, max_length=cut, overlength="truncate").encode_train(sample)
    assert torch.equal(truncated["input_ids"][0], ids[:cut])
    assert torch.equal(truncated["labels"][0], labels[:cut])
    assert (truncated["labels"] != IGNORE).any()
    for key in ("attention_mask", "mm_token_type_ids"):
        if key in full:
            assert torch.equal(truncated[key][0], full[key][0][:cut])
    # A cut before the first answer token leaves nothing to learn (an all -100 batch has a NaN
    # loss): skipped as well.
    first_answer = int((labels != IGNORE).nonzero()[0])
    assert (
        Encoder(family, processor, max_length=first_answer, overlength="truncate").encode_train(sample)
        is None
    )
    # A cut inside the image would break the image: such a sample is skipped instead.
    assert (
        Encoder(family, processor, max_length=last_image, overlength="truncate").encode_train(sample) is None
    )

    # Skipped samples are counted by collate and the rest still batch.
    encoder = Encoder(family, processor, max_length=cut, overlength="skip")
    batch = encoder.collate([encoder.encode_train(sample), encoder.encode_train(one_turn_sample())])
    assert int(batch["skipped"]) == 1 and batch["input_ids"].shape[0] == 1
    empty = encoder.collate([None])
    assert set(empty) == {"skipped"} and int(empty["skipped"]) == 1


def metaspace_llava_processor():
    """A LlavaProcessor whose tokenizer splits like Llama's SentencePiece: '▁red' owns its space.

    The tiny tokenizer drops spaces (its offsets never cover one); real LLaVA-1.5 tokens carry
    the leading space, so the first answer token's offset starts on the space before the answer.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    words = "USER ASSISTANT : ? What colour is the square How many squares are there red 2".split()
    vocab = {tok: i for i, tok in enumerate(specials + ["\u2581", "\nWhat"])}
    for word in words:
        for form in (word, "\u2581" + word):
            vocab.setdefault(form, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first"), pre_tokenizers.Punctuation()]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def test_llava_labels_with_space_owning_tokens():
    from mllm_cl.families import get_family

    family, processor = get_family("llava"), metaspace_llava_processor()
    sample = {
        "id": "sp",
        "images": [red_image()],
        "messages": [
            {"role": "user", "content": "What colour is the square?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "How many squares are there?"},
            {"role": "assistant", "content": "2"},
        ],
    }
    out = Encoder(family, processor).encode_train(sample)
    ids, labels = out["input_ids"][0], out["labels"][0]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
    assert "<unk>" not in tokens and "\u2581red" in tokens
    kept = labels != IGNORE
    assert processor.tokenizer.convert_ids_to_tokens(labels[kept].tolist()) == [
        "\u2581red",
        "</s>",
        "\u25812",
        "</s>",
    ]
