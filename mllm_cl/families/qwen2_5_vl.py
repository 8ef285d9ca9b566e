"""Qwen2.5-VL: window-attention ViT whose projector (`visual.merger`) sits inside `visual`, + Qwen2.5 LLM.

Chat format: ChatML as in Qwen2.5-VL's chat template, with its default system message
"You are a helpful assistant." when a conversation has none; images become
``<|vision_start|><|image_pad|><|vision_end|>``, expanded by the processor to one pad per merged patch.

Processor quirks: the stock processor cannot be built without a video processor (torchvision, see
`ImageOnlyProcessorMixin`); image resolution is set by ``min_pixels`` / ``max_pixels`` (the
`processor_kwargs` this family takes), which bound the number of image tokens per image.
"""

from __future__ import annotations

from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
)
from transformers.image_utils import SizeDict

from mllm_cl.families.base import Family, ImageOnlyProcessorMixin
from mllm_cl.families.chat import ChatFormat
from mllm_cl.tiny import TokenizerSpecials

QWEN_SYSTEM = "You are a helpful assistant."


class Qwen25VLImageOnlyProcessor(ImageOnlyProcessorMixin, Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without the video processor; reload it with this class, not AutoProcessor."""


class Qwen25VLFamily(Family):
    """Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``)."""

    name = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    chat = ChatFormat(
        image="<|vision_start|><|image_pad|><|vision_end|>",
        system=("<|im_start|>system\n", "<|im_end|>\n"),
        user=("<|im_start|>user\n", "<|im_end|>\n"),
        assistant=("<|im_start|>assistant\n", "<|im_end|>", "\n"),
        generation_prompt="<|im_start|>assistant\n",
    )
    bundled_config = "qwen2.5-vl-7b-instruct"
    tiny_specials = TokenizerSpecials(
        tokens=(
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ),
        named={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
        extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    checkpoint_system_prompt = QWEN_SYSTEM
    tiny_system_prompt = QWEN_SYSTEM
    processor_options = ("min_pixels", "max_pixels")
    image_only_processor = Qwen25VLImageOnlyProcessor

    def component_roots(self, model):
        inner = model.model
        # The projector (merger) sits inside `visual`: listed after vision so it wins.
        return {
            "vision": [("", inner.visual)],
            "projector": [("", inner.visual.merger)],
            "llm": [("", inner.language_model), ("lm_head.", model.lm_head)],
        }

    def tiny_image_processor(self, size):
        pixels = size.image_size * size.image_size
        # The PIL backend by name: the default class looks for torchvision (absent on CPU) and warns.
        return Qwen2VLImageProcessorPil(
            patch_size=size.patch_size // 2,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": pixels, "longest_edge": pixels},
        )

    def configure_processor(self, processor):
        # The image processor's size bounds are min_pixels (shortest_edge) and max_pixels
        # (longest_edge); set them there rather than as call-time kwargs (deprecated in transformers 5).
        kw, ip = self.processor_kwargs, processor.image_processor
        if kw:
            low = kw.get("min_pixels", ip.size["shortest_edge"])
            high = kw.get("max_pixels", ip.size["longest_edge"])
            # Only max_pixels given, below the checkpoint's floor: the cap wins (as smart_resize does).
            low = min(low, high) if "min_pixels" not in kw else low
            ip.size = SizeDict(shortest_edge=low, longest_edge=high)

    def tiny_processor_from_parts(self, image_processor, tokenizer, size):
        return Qwen25VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer)

    def tiny_config(self, tokenizer, size):
        head_dim = size.text_hidden // size.heads
        quarter = head_dim // 8  # mrope sections (t, h, w) must sum to head_dim / 2
        vision = dict(
            depth=size.vision_layers,
            hidden_size=size.vision_hidden,
            intermediate_size=2 * size.vision_hidden,
            num_heads=size.heads,
            patch_size=size.patch_size // 2,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=size.text_hidden,
            window_size=size.image_size,
            fullatt_block_indexes=[size.vision_layers - 1],
        )
        text = dict(
            vocab_size=len(tokenizer),
            hidden_size=size.text_hidden,
            intermediate_size=4 * size.text_hidden,
            num_hidden_layers=size.text_layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.heads,
            max_position_embeddings=512,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2 * quarter, quarter, head_dim // 2 - 3 * quarter],
            },
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
        )
        ids = tokenizer.convert_tokens_to_ids
        return Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
        )
