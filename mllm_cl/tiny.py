"""Tiny models of the real architectures, built offline from config with random weights.

Tests and the CPU demo need a LLaVA-1.5 / Qwen2.5-VL that loads without a hub: we build the
genuine `LlavaForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` classes from small
configs, with a word-level tokenizer and a processor constructed in code. Everything the recipes,
collation and generation touch (module names, image-token expansion, chat template, mrope
positions) is the real code path; only the sizes are small.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Words of the chat templates and of generic prompts; the synthetic generator adds its own.
_BASE_WORDS = (
    "user assistant system you are a helpful chat between curious human and an artificial intelligence "
    "the image what is in this how many of are there yes no answer question with one word or number "
    "describe picture left right above below colour color shape which choose"
).split()
_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
_PUNCT = list(".,:;?!'\"()-/<>|_")
# Every word of the synthetic generator's questions and answers (`mllm_cl.data.synthetic.vocabulary()`,
# sorted), written out so building a tokenizer does not import the data package (no import cycle);
# tests/test_synthetic.py fails when the generator's wording changes and this list must follow.
SYNTHETIC_WORDS = (
    ", . 1 2 3 4 5 : ? are blue choose circle circles colour green how image in is left many more no "
    "objects of one orange purple red shape square squares than the there this triangle triangles what "
    "which yellow yes"
).split()
WORD_RE = re.compile(r"\w+|[^\w\s]")


def _vocabulary(extra: list[str] | None) -> list[str]:
    """Word list of the tiny tokenizer: template words, digits 0-100, number words, punctuation."""
    words = _BASE_WORDS + _NUMBER_WORDS + [str(i) for i in range(101)] + _PUNCT
    words += SYNTHETIC_WORDS + list(extra or [])
    seen: dict[str, None] = {}
    for word in words:
        for piece in WORD_RE.findall(word.lower()):
            seen.setdefault(piece, None)
    return list(seen)


@dataclass(frozen=True)
class TokenizerSpecials:
    """Special tokens of a family's tiny tokenizer (each family file declares its own).

    Args:
        tokens: every special token, in id order (they take the first ids).
        named: HF's named specials, e.g. ``{"eos_token": "<|im_end|>", "pad_token": ...}``;
            ``unk_token`` is required (the word-level model maps unknown words to it).
        extra: tokens the processor looks up by attribute, e.g. ``{"image_token": "<image>"}``.
    """

    tokens: tuple[str, ...]
    named: dict[str, str]
    extra: dict[str, str]


def build_tokenizer(
    specials: TokenizerSpecials, extra_words: list[str] | None = None, padding_side: str = "right"
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer (lower-cased, whitespace + punctuation split).

    Word-level keeps every synthetic answer a single token, so a 3M-parameter model learns in
    seconds; decoding joins words with spaces, which normalised exact match ignores.
    """
    vocab = {tok: i for i, tok in enumerate(specials.tokens)}
    for word in _vocabulary(extra_words):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials.named["unk_token"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    additional = [s for s in specials.tokens if s not in specials.named.values()]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        additional_special_tokens=additional,
        extra_special_tokens=dict(specials.extra),
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
        **specials.named,
    )
    tok.add_special_tokens({"additional_special_tokens": additional})
    return tok


@dataclass(frozen=True)
class TinySize:
    """Sizes of a tiny model. `tiny` is for unit tests, `demo` for the forgetting demo."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    heads: int = 2


SIZES = {
    "tiny": TinySize(),
    # 64 px images cut in 16 px patches -> 16 image tokens: few image tokens learn fastest on CPU.
    "demo": TinySize(
        image_size=64, patch_size=16, vision_hidden=128, text_hidden=256, text_layers=4, heads=4
    ),
}
