"""Family options (`model.family_options`): the system prompt each family renders by default, and
Qwen2.5-VL's image resolution bounds passed to its processor.

Expected prompts are written out by hand from the sources named in the family files (LLaVA-1.5:
haotian-liu/LLaVA `conv_vicuna_v1`, selected by `--version v1` in scripts/v1_5/finetune.sh).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mllm_cl.cli import MllmCLI
from mllm_cl.data.collate import Encoder, prepare_messages
from mllm_cl.data.stream import TaskStream
from mllm_cl.errors import ConfigError
from mllm_cl.export import export_hf
from mllm_cl.families import EXPORT_RECORD, get_family
from mllm_cl.module import MLLMModule

ROOT = Path(__file__).resolve().parent.parent
QUESTION = {"images": [Image.new("RGB", (32, 32))], "messages": [{"role": "user", "content": "What colour?"}]}
VICUNA_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat colour? ASSISTANT:"
)
PLAIN_PROMPT = "USER: <image>\nWhat colour? ASSISTANT:"


def prompt(family) -> str:
    return family.render(prepare_messages(QUESTION, family, for_generation=True), True).text


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> str:
    """A LLaVA processor saved as a released checkpoint would hold it: no mllm_cl export record."""
    out = tmp_path_factory.mktemp("llava_ckpt")
    get_family("llava").tiny_processor("tiny").save_pretrained(out)
    return str(out)


def test_tiny_llava_renders_no_system_prompt():
    """A tiny model learns from scratch: the demo's prompts (and accuracy) are those of before."""
    family = get_family("llava")
    family.tiny_processor("tiny")
    assert prompt(family) == PLAIN_PROMPT


def test_a_released_llava_checkpoint_gets_the_vicuna_v1_system_prompt(llava_dir):
    family = get_family("llava")
    family.load_processor(llava_dir)
    assert prompt(family) == VICUNA_PROMPT


@pytest.mark.parametrize("option,want", [(None, PLAIN_PROMPT), ("Be brief.", "Be brief. " + PLAIN_PROMPT)])
def test_the_option_turns_it_off_or_replaces_it(llava_dir, option, want):
    family = get_family("llava", {"system_prompt": option})
    family.load_processor(llava_dir)
    assert prompt(family) == want
    family.tiny_processor("tiny")
    assert prompt(family) == want


def test_an_export_records_the_prompt_it_was_trained_with(llava_dir, tmp_path):
    """Stage 2 of a chain (the demo: base model exported, then fine-tuned) keeps stage 1's prompt."""
    for option in ("auto", "Be brief.", None):
        trained = get_family("llava", {"system_prompt": option})
        model, processor = trained.build_tiny("tiny")
        out = tmp_path / str(option)
        export_hf(model, processor, str(out), trained)
        reloaded = get_family("llava")
        reloaded.load_processor(str(out))
        assert reloaded.system_prompt == trained.system_prompt == {"auto": None}.get(option, option)
    # Given only the family name, the prompt is unknown: nothing recorded, loading assumes the released one.
    export_hf(model, processor, str(tmp_path / "by_name"), "llava")
    assert "system_prompt" not in json.loads((tmp_path / "by_name" / EXPORT_RECORD).read_text())


def qwen_image_tokens(processor) -> int:
    family = get_family("qwen2_5_vl")
    out = Encoder(family, processor).encode_prompt(QUESTION)
    return int((out["input_ids"] == family.image_token_id(processor)).sum())


def test_qwen_pixel_bounds_reach_the_processor(tmp_path):
    """32x32 px at patch 4, merge 2: 8x8 patches -> 16 image tokens; max_pixels 16x16 -> 4x4 -> 4."""
    assert qwen_image_tokens(get_family("qwen2_5_vl").tiny_processor("tiny")) == 16
    capped = get_family("qwen2_5_vl", {"processor_kwargs": {"max_pixels": 16 * 16}})
    assert qwen_image_tokens(capped.tiny_processor("tiny")) == 4
    # A checkpoint's processor gets them through from_pretrained.
    get_family("qwen2_5_vl").tiny_processor("tiny").save_pretrained(tmp_path)
    (tmp_path / EXPORT_RECORD).write_text(json.dumps({"image_only_processor": True}))
    assert qwen_image_tokens(capped.load_processor(str(tmp_path))) == 4


def test_family_options_come_from_yaml():
    cli = MllmCLI(
        MLLMModule,
        TaskStream,
        args=[
            "--config",
            str(ROOT / "configs" / "tiny_llava_test.yaml"),
            "--model.family=qwen2_5_vl",
            '--model.family_options={"processor_kwargs": {"max_pixels": 256}, "system_prompt": "Count."}',
        ],
        run=False,
    )
    assert qwen_image_tokens(cli.model.processor) == 4
    assert cli.model.family.system_prompt == "Count."


@pytest.mark.parametrize(
    "options,words",
    [
        ({"system_promt": None}, ["system_promt", "system_prompt"]),
        ({"processor_kwargs": {"max_pixel": 9}}, ["max_pixel", "max_pixels"]),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_key(options, words):
    with pytest.raises(ConfigError) as info:
        get_family("qwen2_5_vl", options)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words)
