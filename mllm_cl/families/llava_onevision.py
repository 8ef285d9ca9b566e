"""LLaVA-OneVision (llava-hf layout): SigLIP-so400m tower (last layer dropped) + 2-layer MLP + Qwen2-7B.

The main backbone of Zhu et al. 2025 (LMM_CL, a LLaVA-NeXT fork). Images are tiled "anyres": the
image at the tower's resolution plus a grid of tiles chosen from `image_grid_pinpoints`, each tile's
features unpadded to the aspect ratio, a learned ``image_newline`` vector after every feature row.

Chat format: LLaVA-NeXT's ``qwen_1_5`` conversation, the one OneVision was trained with
(``preprocess_qwen``: ChatML with the system message "You are a helpful assistant."):
``<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n<image>\\n{q}<|im_end|>\\n<|im_start|>assistant\\n``.
transformers' conversion script writes a chat template that renders the same text when given that
system message.

Parts: ``image_newline`` is a bare parameter of the inner model; LMM_CL trains it with the LLM
(its "LLM" = every parameter outside ``vision_tower`` and ``mm_projector``), so it is ``llm.image_newline``.

Processor quirks: the stock processor needs a video processor (torchvision, see
`ImageOnlyProcessorMixin`); an image's tile count depends on its size, so a batch pads
``pixel_values`` along the tile axis with zeros as the processor does for a batch of images
(the model reads only each image's own tiles, from ``image_sizes``); ``batch_num_images`` (tiling is
skipped for multi-image samples) travels with the batch.
"""

from __future__ import annotations

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,  # the PIL backend: tiny models need no torchvision
)

from mllm_cl.families.base import Family, ImageOnlyProcessorMixin
from mllm_cl.families.chat import ChatFormat
from mllm_cl.tiny import TokenizerSpecials

QWEN_1_5_SYSTEM = "You are a helpful assistant."


class LlavaOnevisionImageOnlyProcessor(ImageOnlyProcessorMixin, LlavaOnevisionProcessor):
    """LLaVA-OneVision processor without the video processor; reload it with this class.

    Its options are named in the signature: `save_pretrained` writes only those.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        super().__init__(
            image_processor,
            tokenizer,
            chat_template,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )


class LlavaOnevisionFamily(Family):
    """LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``)."""

    name = "llava_onevision"
    model_class = LlavaOnevisionForConditionalGeneration
    chat = ChatFormat(
        image="<image>",
        system=("<|im_start|>system\n", "<|im_end|>\n"),
        user=("<|im_start|>user\n", "<|im_end|>\n"),
        assistant=("<|im_start|>assistant\n", "<|im_end|>", "\n"),
        generation_prompt="<|im_start|>assistant\n",
    )
    bundled_config = "llava-onevision-qwen2-7b-ov-hf"
    # Qwen2's specials plus the two tokens llava-hf added (<image> 151646, <video> 151647).
    tiny_specials = TokenizerSpecials(
        tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"),
        named={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
        extra={"image_token": "<image>", "video_token": "<video>"},
    )
    checkpoint_system_prompt = QWEN_1_5_SYSTEM
    tiny_system_prompt = QWEN_1_5_SYSTEM
    image_only_processor = LlavaOnevisionImageOnlyProcessor
    image_keys = ("pixel_values", "image_sizes", "batch_num_images")

    def component_roots(self, model):
        inner = model.model
        return {
            "vision": [("", inner.vision_tower)],
            "projector": [("", inner.multi_modal_projector)],
            "llm": [("", inner.language_model), ("lm_head.", model.lm_head)],
        }

    def component_params(self, model):
        return {"llm": [("image_newline", model.model.image_newline)]}

    def batch_images(self, key, parts):
        if key != "pixel_values":
            return torch.cat(parts)
        tiles = max(p.shape[1] for p in parts)  # (images, tiles, 3, H, W)
        return torch.cat(
            [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1])) for p in parts]
        )

    @staticmethod
    def _pinpoints(size) -> list[list[int]]:
        """1x1 to 2x2 tiles of the tower's resolution (the real model goes up to 6x6 of 384 px)."""
        s = size.image_size
        return [[s * h, s * w] for h in (1, 2) for w in (1, 2)]

    def tiny_image_processor(self, size):
        s = size.image_size
        return LlavaOnevisionImageProcessorPil(
            size={"height": s, "width": s}, image_grid_pinpoints=self._pinpoints(size)
        )

    def tiny_processor_from_parts(self, image_processor, tokenizer, size):
        return LlavaOnevisionImageOnlyProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            num_image_tokens=(size.image_size // size.patch_size) ** 2,
            vision_feature_select_strategy="full",
        )

    def tiny_config(self, tokenizer, size):
        vision = dict(
            model_type="siglip_vision_model",
            hidden_size=size.vision_hidden,
            intermediate_size=4 * size.vision_hidden,
            num_hidden_layers=size.vision_layers,
            num_attention_heads=size.heads,
            image_size=size.image_size,
            patch_size=size.patch_size,
            vision_use_head=False,
        )
        text = dict(
            model_type="qwen2",
            vocab_size=len(tokenizer),
            hidden_size=size.text_hidden,
            intermediate_size=4 * size.text_hidden,
            num_hidden_layers=size.text_layers,
            num_attention_heads=size.heads,
            num_key_value_heads=max(1, size.heads // 2),  # grouped-query attention, as Qwen2-7B (28 / 4)
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
        )
        ids = tokenizer.convert_tokens_to_ids
        return LlavaOnevisionConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=ids("<image>"),
            video_token_index=ids("<video>"),
            image_grid_pinpoints=self._pinpoints(size),
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
        )
