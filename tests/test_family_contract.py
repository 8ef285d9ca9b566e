"""The family contract: every registered family (LLaVA-1.5, Qwen2.5-VL, LLaVA-OneVision) must

1. render the same text as its processor's chat template (`apply_chat_template`), and match the
   upstream chat template where we claim fidelity to it;
2. give every parameter exactly one canonical name, in the component the HF layout puts it in;
3. batch images as its processor does for a batch;
4. go through a tiny build -> training steps (real MLLMModule + Lightning Trainer) -> greedy
   generation -> export -> `from_pretrained` round trip with equal logits.

A new family is covered once it is in `FAMILIES` and has its rows in `REAL_LAYOUT` and `HAND_PROMPT` below.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mllm_cl.data import Synthetic, Task, TaskStream
from mllm_cl.data.collate import Encoder, prepare_messages
from mllm_cl.export import export_hf
from mllm_cl.families import FAMILIES, get_family
from mllm_cl.module import MLLMModule
from mllm_cl.plan import build_meta_model, load_config
from strategies.freeze import SAProj
from tests.helpers import quiet_trainer

NAMES = sorted(FAMILIES)

# Real-name prefixes of each component in the HF layout (transformers 5.x, see MEASURED.md), written
# out by hand; the first matching prefix wins. LLaVA-OneVision's bare `image_newline` goes with the
# LLM, as LMM_CL's "LLM" recipe trains every parameter outside vision_tower / mm_projector.
REAL_LAYOUT = {
    "llava": [
        ("model.vision_tower.", "vision"),
        ("model.multi_modal_projector.", "projector"),
        ("model.language_model.", "llm"),
        ("lm_head.", "llm"),
    ],
    "qwen2_5_vl": [
        ("model.visual.merger.", "projector"),
        ("model.visual.", "vision"),
        ("model.language_model.", "llm"),
        ("lm_head.", "llm"),
    ],
    "llava_onevision": [
        ("model.vision_tower.", "vision"),
        ("model.multi_modal_projector.", "projector"),
        ("model.image_newline", "llm"),
        ("model.language_model.", "llm"),
        ("lm_head.", "llm"),
    ],
}

# One generation prompt per family, written by hand from each format (tiny models: the auto system
# prompt is LLaVA's none and the ChatML families' "You are a helpful assistant.").
HAND_PROMPT = {
    "llava": "USER: <image>\nWhat colour? ASSISTANT:",
    "qwen2_5_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>\nWhat colour?<|im_end|>\n<|im_start|>assistant\n",
    "llava_onevision": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<image>\nWhat colour?<|im_end|>\n<|im_start|>assistant\n",
}

# Upstream chat templates (public data, compared against, never used by the code):
# llava-hf/llava-1.5-7b-hf chat_template.json, and the template transformers'
# convert_llava_onevision_weights_to_hf.py writes for llava-hf/llava-onevision-*.
UPSTREAM = {
    "llava": "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}",
    "llava_onevision": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all video then #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] }}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
}


def image(w: int = 32, h: int = 32, rgb=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (w, h), rgb)


def sample(question="What colour?", answer="red", img=None, **extra) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"id": "s", "images": [img or image()], "messages": messages, "answers": [answer], **extra}


def hf_messages(turns: list[tuple[str, str]], system: str | None = None) -> list[dict]:
    """HF's list-of-items conversation; the first user turn carries the image."""
    out = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    for i, (role, text) in enumerate(turns):
        items = [{"type": "image"}] if i == 0 else []
        out.append({"role": role, "content": items + [{"type": "text", "text": text}]})
    return out


CONVERSATIONS = [
    [("user", "What colour?")],
    [("user", "What colour?"), ("assistant", "red"), ("user", "How many?"), ("assistant", "2")],
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("system", ["auto", None, "Be brief, don't ramble."])
def test_render_equals_the_processors_chat_template(name, system):
    family = get_family(name, {"system_prompt": system})
    processor = family.tiny_processor("tiny")
    for turns in CONVERSATIONS:
        ours_sample = {
            "images": [image()],
            "messages": [{"role": r, "content": t} for r, t in turns],
        }
        generate = turns[-1][0] == "user"
        rendered = family.render(prepare_messages(ours_sample, family, for_generation=False), generate)
        theirs = processor.apply_chat_template(
            hf_messages(turns), add_generation_prompt=generate, tokenize=False
        )
        assert theirs == rendered.text
        # An explicit system message replaces the default one in both.
        with_system = [{"role": "system", "content": "Count."}, *ours_sample["messages"]]
        rendered = family.render(
            prepare_messages({**ours_sample, "messages": with_system}, family, False), generate
        )
        theirs = processor.apply_chat_template(
            hf_messages(turns, "Count."), add_generation_prompt=generate, tokenize=False
        )
        assert theirs == rendered.text
    if system == "auto":
        prompt = family.render(prepare_messages(sample(), family, for_generation=True), True).text
        assert prompt == HAND_PROMPT[name]


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_prompts_match_the_upstream_template_given_the_trained_system_prompt(name):
    """LLaVA-1.5's Vicuna v1 prompt and OneVision's qwen_1_5 prompt are what the upstream templates
    render once the training-time system prompt is passed as a system message."""
    from transformers.utils.chat_template_utils import render_jinja_template

    family = get_family(name, {"system_prompt": get_family(name).checkpoint_system_prompt})
    ours = family.render(prepare_messages(sample(), family, for_generation=True), True).text
    messages = hf_messages([("user", "What colour?")], family.system_prompt)
    theirs, _ = render_jinja_template([messages], chat_template=UPSTREAM[name], add_generation_prompt=True)
    assert theirs[0] == ours


@pytest.mark.parametrize("name", NAMES)
def test_canonical_names_cover_every_parameter_once(name):
    family = get_family(name)
    tiny, _ = family.build_tiny("tiny")
    with torch.device("meta"):
        real = build_meta_model(family, load_config(family, family.bundled_config))
    for model in (tiny, real):
        names = family.canonical_names(model)
        params = [n for n, _ in model.named_parameters()]
        assert sorted(names) == sorted(params)
        assert len(set(names.values())) == len(params), "two parameters share a canonical name"
        for real_name, canonical in names.items():
            want = next(comp for prefix, comp in REAL_LAYOUT[name] if real_name.startswith(prefix))
            assert canonical.split(".", 1)[0] == want, (real_name, canonical)
        assert {c.split(".", 1)[0] for c in names.values()} == {"vision", "projector", "llm"}


@pytest.mark.parametrize("name", NAMES)
def test_batched_images_equal_the_processors_batch(name):
    """Two samples with different image shapes, encoded one by one and collated, give the image
    tensors the processor gives for both at once (OneVision: tile counts differ, zero-padded)."""
    family = get_family(name)
    processor = family.tiny_processor("tiny")
    images = [image(32, 32), image(64, 24, (20, 200, 40))]
    encoder = Encoder(family, processor)
    batch = encoder.collate([encoder.encode_prompt(sample(img=im)) for im in images], padding_side="left")
    texts = [family.render(prepare_messages(sample(img=im), family, True), True).text for im in images]
    together = processor(text=texts, images=images, return_tensors="pt", padding=True)
    for key in family.image_keys:
        if key in together:
            assert torch.equal(batch[key], together[key]), key


@pytest.fixture(scope="module", params=NAMES)
def trained(request, tmp_path_factory):
    """(name, module, initial weights) after a few SAProj steps on a tiny model with a real Trainer."""
    name = request.param
    module = MLLMModule(family=name, recipe=SAProj(), lr=1e-2, warmup_ratio=0.0, max_new_tokens=3)
    data = Synthetic("colour", n=8, seed=1, image_size=32, object_size=(0.5, 0.9))
    stream = TaskStream(tasks=[Task("colour", train=data, steps=3)], batch_size=4, eval_batch_size=4)
    initial = {n: p.detach().clone() for n, p in get_family(name).build_tiny("tiny")[0].named_parameters()}
    quiet_trainer(tmp_path_factory.mktemp(name)).fit(module, datamodule=stream)
    module.model.eval()
    return name, module, initial


def test_training_steps_change_exactly_the_recipe(trained):
    name, module, initial = trained
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(p.detach(), initial[n])}
    names = module.canonical_names()
    assert changed and all(SAProj().selects(names[n]) for n in changed)


def test_batched_generation_equals_one_at_a_time(trained):
    _, module, _ = trained
    encoder = Encoder(module.family, module.processor)
    samples = [sample(img=image(32, 32)), sample("What shape?", img=image(64, 24, (20, 200, 40)))]
    prompts = [encoder.encode_prompt(s) for s in samples]
    together = module.generate(encoder.collate(prompts, padding_side="left"))
    alone = [module.generate(encoder.collate([p], padding_side="left"))[0] for p in prompts]
    assert len(together) == 2 and together == alone


def test_export_round_trip_gives_equal_logits(trained, tmp_path):
    name, module, _ = trained
    family = module.family
    out = tmp_path / "hf"
    export_hf(module.model, module.processor, str(out), family)
    model = family.model_class.from_pretrained(out).eval()
    reloaded = get_family(name)
    processor = reloaded.load_processor(str(out))
    assert type(processor) is type(module.processor)
    assert reloaded.system_prompt == family.system_prompt  # the export record restores "auto"

    encoder = Encoder(family, module.processor)
    items = [encoder.encode_train(sample(img=im)) for im in (image(32, 32), image(64, 24))]
    batch = encoder.collate(items)
    batch.pop("skipped")
    with torch.no_grad():
        assert torch.equal(module.model(**batch).logits, model(**batch).logits)
    # The reloaded processor encodes the same tokens and its chat template is the training format.
    again = Encoder(reloaded, processor).collate(
        [Encoder(reloaded, processor).encode_train(sample(img=im)) for im in (image(32, 32), image(64, 24))]
    )
    assert torch.equal(again["input_ids"], batch["input_ids"])
    messages = hf_messages([("user", "What colour?")])
    assert (
        processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        == HAND_PROMPT[name]
    )
