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

from tokenizers import Tokenizer, models, pre_tokenizers
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
LLAVA_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
WORD_RE = re.compile(r"\w+|[^\w\s]")


def _vocabulary(extra: list[str] | None) -> list[str]:
    """Word list of the tiny tokenizer: template words, digits 0-100, number words, punctuation."""
    from mllm_cl.data.synthetic import vocabulary as synthetic_vocabulary

    words = _BASE_WORDS + _NUMBER_WORDS + [str(i) for i in range(101)] + _PUNCT
    words += synthetic_vocabulary() + list(extra or [])
    seen: dict[str, None] = {}
    for word in words:
        for piece in WORD_RE.findall(word.lower()):
            seen.setdefault(piece, None)
    return list(seen)


def build_tokenizer(
    family: str, extra_words: list[str] | None = None, padding_side: str = "right"
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer (lower-cased, whitespace + punctuation split).

    Word-level keeps every synthetic answer a single token, so a 3M-parameter model learns in
    seconds; decoding joins words with spaces, which normalised exact match ignores.
    """
    specials = LLAVA_SPECIALS if family == "llava" else QWEN_SPECIALS
    vocab = {tok: i for i, tok in enumerate(specials)}
    unk = "<unk>" if family == "llava" else "<|endoftext|>"
    for word in _vocabulary(extra_words):
        vocab.setdefault(word, len(vocab))
    from tokenizers import normalizers

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if family == "llava":
        kwargs = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
        extra_special = {"image_token": "<image>"}
    else:
        kwargs = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
        extra_special = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        additional_special_tokens=[s for s in specials if s not in kwargs.values()],
        extra_special_tokens=extra_special,
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    tok.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in kwargs.values()]})
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
