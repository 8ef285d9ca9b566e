"""LLaVA-1.5 in the llava-hf layout: CLIP ViT-L/336 + 2-layer MLP projector + Vicuna-7B.

Chat format: the Vicuna v1 conversation LLaVA-1.5 was fine-tuned with (haotian-liu/LLaVA
``scripts/v1_5/finetune.sh`` passes ``--version v1`` = ``conv_vicuna_v1``, SeparatorStyle.TWO):
``{system} USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: ...`` and ``ASSISTANT:`` to
generate. llava-hf's own chat template renders the same text when handed the system prompt as a
system message, but adds no system prompt by itself; we render it by default for the released
weights (`checkpoint_system_prompt`). The answer is closed by ``</s>`` as in training (llava-hf's
template, meant for inference, closes it with a space).
"""

from __future__ import annotations

from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from mllm_cl.families.base import Family
from mllm_cl.families.chat import ChatFormat
from mllm_cl.tiny import TokenizerSpecials

# conv_vicuna_v1.system in haotian-liu/LLaVA llava/conversation.py ("user", not conv_llava_v1's "human").
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class LlavaFamily(Family):
    """LLaVA-1.5 (``LlavaForConditionalGeneration``)."""

    name = "llava"
    model_class = LlavaForConditionalGeneration
    chat = ChatFormat(
        image="<image>",
        system=("", " "),
        user=("USER: ", " "),
        assistant=("ASSISTANT: ", "</s>", ""),
        generation_prompt="ASSISTANT:",
    )
    bundled_config = "llava-1.5-7b-hf"
    tiny_specials = TokenizerSpecials(
        tokens=("<pad>", "<unk>", "<s>", "</s>", "<image>"),
        named={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
        extra={"image_token": "<image>"},
    )
    checkpoint_system_prompt = VICUNA_V1_SYSTEM
    # A tiny model learns from scratch: no trained-with prompt to match, and the demo's results
    # (trained without one) stay as they were.
    tiny_system_prompt = None

    def component_roots(self, model):
        inner = model.model
        return {
            "vision": [("", inner.vision_tower)],
            "projector": [("", inner.multi_modal_projector)],
            "llm": [("", inner.language_model), ("lm_head.", model.lm_head)],
        }

    def tiny_image_processor(self, size):
        # The PIL backend by name: the default class looks for torchvision (absent on CPU) and warns.
        return CLIPImageProcessorPil(
            size={"shortest_edge": size.image_size},
            crop_size={"height": size.image_size, "width": size.image_size},
            do_center_crop=True,
        )

    def tiny_processor_from_parts(self, image_processor, tokenizer, size):
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=size.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # the CLS token that "default" drops
        )

    def tiny_config(self, tokenizer, size):
        vision = dict(
            model_type="clip_vision_model",
            hidden_size=size.vision_hidden,
            intermediate_size=4 * size.vision_hidden,
            num_hidden_layers=size.vision_layers,
            num_attention_heads=size.heads,
            image_size=size.image_size,
            patch_size=size.patch_size,
            projection_dim=size.vision_hidden,
        )
        text = dict(
            model_type="llama",
            vocab_size=len(tokenizer),
            hidden_size=size.text_hidden,
            intermediate_size=4 * size.text_hidden,
            num_hidden_layers=size.text_layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.heads,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=(size.image_size // size.patch_size) ** 2,
            # -1 (not LLaVA-1.5's -2) so every vision parameter gets a gradient in tiny tests.
            vision_feature_layer=-1,
        )
