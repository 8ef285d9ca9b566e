"""Model families: everything that differs between LLaVA-1.5 and Qwen2.5-VL lives here.

A family adapter knows the HF class, the processor, the chat template, where the vision tower,
projector and language model live, and the decoder-layer classes (FSDP wrap and activation
checkpointing policies need them). The rest of the toolkit speaks only in *canonical names*:
``<component>.<name inside the component>`` with components ``vision``, ``projector`` and ``llm``
(``llm`` = the language model plus ``lm_head``). Recipes are regexes over canonical names, so
``^llm\\.layers\\.\\d+\\.mlp\\.gate_proj`` can never match Qwen2.5-VL's ``visual.blocks.N.mlp.gate_proj``
and ``^llm\\..*self_attn`` never matches CLIP's ``self_attn``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import (
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)

from mllm_cl.tiny import SIZES, build_tokenizer

COMPONENTS = ("vision", "projector", "llm")


class Qwen25VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without the video processor.

    The stock processor insists on a video processor, and video processors need torchvision, which
    a CPU environment cannot have (its wheels are CUDA builds). Images are all we train on.
    Reload it with this class, not AutoProcessor.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


@dataclass
class Rendered:
    """A conversation rendered to text; `targets` are the character spans trained on."""

    text: str
    targets: list[tuple[int, int]] = field(default_factory=list)


class Family:
    """Base adapter. Subclasses fill the class attributes and the few methods below."""

    name: str
    model_class: type
    image_placeholder: str  # what one image becomes in the rendered text before expansion
    end_of_turn: str  # appended to every answer so the model learns to stop

    # ---- parts -------------------------------------------------------------------------------
    def component_roots(self, model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
        """component -> [(prefix inside the component, module)]; later entries win on overlap."""
        raise NotImplementedError

    def canonical_names(self, model: nn.Module) -> dict[str, str]:
        """Map every parameter's real name to its canonical ``component.name``."""
        owner: dict[int, str] = {}
        for comp, roots in self.component_roots(model).items():
            for prefix, root in roots:
                for name, param in root.named_parameters():
                    owner[id(param)] = f"{comp}.{prefix}{name}"
        names = {}
        for real, param in model.named_parameters():
            if id(param) not in owner:
                raise RuntimeError(
                    f"{self.name}: parameter {real} belongs to no component; update families.py"
                )
            names[real] = owner[id(param)]
        return names

    def decoder_layer_classes(self, model: nn.Module) -> set[type]:
        """Transformer block classes of the LLM and the vision tower (FSDP / checkpointing units)."""
        classes = set()
        for _, roots in self.component_roots(model).items():
            for _, root in roots:
                for sub in root.modules():
                    if isinstance(sub, nn.ModuleList) and len(sub) and isinstance(sub[0], nn.Module):
                        classes.add(type(sub[0]))
        return {c for c in classes if hasattr(c, "forward") and c.__name__.endswith(("Layer", "Block"))}

    # ---- text --------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
        raise NotImplementedError

    def image_token_id(self, processor) -> int:
        return processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    # ---- building ----------------------------------------------------------------------------
    def tiny_config(self, tokenizer, size: str):
        raise NotImplementedError

    def tiny_processor(self, size: str):
        raise NotImplementedError

    def build_tiny(self, size: str = "tiny", seed: int = 0):
        """A randomly initialised model of the real architecture and its offline processor."""
        if size not in SIZES:
            raise ValueError(f"tiny size '{size}' unknown; choose one of {sorted(SIZES)}")
        processor = self.tiny_processor(size)
        config = self.tiny_config(processor.tokenizer, size)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = self.model_class(config)
        return model, processor

    def load_processor(self, path: str):
        return AutoProcessor.from_pretrained(path)

    def load(self, path: str, dtype: torch.dtype, attn_implementation: str | None, trust_remote_code: bool):
        """Load real weights from a local directory or hub id."""
        kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        return self.model_class.from_pretrained(path, **kwargs)


class LlavaFamily(Family):
    """LLaVA-1.5 in the llava-hf layout (CLIP ViT-L/336 + MLP projector + Vicuna)."""

    name = "llava"
    model_class = LlavaForConditionalGeneration
    image_placeholder = "<image>"
    end_of_turn = "</s>"

    def component_roots(self, model):
        inner = model.model
        return {
            "vision": [("", inner.vision_tower)],
            "projector": [("", inner.multi_modal_projector)],
            "llm": [("", inner.language_model), ("lm_head.", model.lm_head)],
        }

    def render(self, messages, add_generation_prompt=False):
        # llava-hf chat template: "USER: <image>\n{q} ASSISTANT: {a}</s>USER: ..."
        out, targets = "", []
        for msg in messages:
            if msg["role"] == "system":
                out += msg["content"] + " "
            elif msg["role"] == "user":
                out += f"USER: {msg['content']} "
            else:
                out += "ASSISTANT: "
                start = len(out)
                out += msg["content"] + self.end_of_turn
                targets.append((start, len(out)))
        if add_generation_prompt:
            out += "ASSISTANT:"
        return Rendered(out, targets)

    def tiny_processor(self, size):
        from transformers import CLIPImageProcessor

        s = SIZES[size]
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": s.image_size},
            crop_size={"height": s.image_size, "width": s.image_size},
            do_center_crop=True,
        )
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=build_tokenizer("llava"),
            patch_size=s.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # the CLS token that "default" drops
        )

    def tiny_config(self, tokenizer, size):
        s = SIZES[size]
        vision = dict(
            model_type="clip_vision_model",
            hidden_size=s.vision_hidden,
            intermediate_size=4 * s.vision_hidden,
            num_hidden_layers=s.vision_layers,
            num_attention_heads=s.heads,
            image_size=s.image_size,
            patch_size=s.patch_size,
            projection_dim=s.vision_hidden,
        )
        text = dict(
            model_type="llama",
            vocab_size=len(tokenizer),
            hidden_size=s.text_hidden,
            intermediate_size=4 * s.text_hidden,
            num_hidden_layers=s.text_layers,
            num_attention_heads=s.heads,
            num_key_value_heads=s.heads,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=(s.image_size // s.patch_size) ** 2,
            # -1 (not LLaVA-1.5's -2) so every vision parameter gets a gradient in tiny tests.
            vision_feature_layer=-1,
        )


class Qwen25VLFamily(Family):
    """Qwen2.5-VL (window-attention ViT with `visual.merger` projector + Qwen2.5 LLM)."""

    name = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    image_placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    end_of_turn = "<|im_end|>"
    default_system = "You are a helpful assistant."

    def component_roots(self, model):
        inner = model.model
        # The projector (merger) sits inside `visual`: listed after vision so it wins.
        return {
            "vision": [("", inner.visual)],
            "projector": [("", inner.visual.merger)],
            "llm": [("", inner.language_model), ("lm_head.", model.lm_head)],
        }

    def render(self, messages, add_generation_prompt=False):
        out, targets = "", []
        if not messages or messages[0]["role"] != "system":
            out += f"<|im_start|>system\n{self.default_system}<|im_end|>\n"
        for msg in messages:
            out += f"<|im_start|>{msg['role']}\n"
            if msg["role"] == "assistant":
                start = len(out)
                out += msg["content"] + self.end_of_turn
                targets.append((start, len(out)))
                out += "\n"
            else:
                out += msg["content"] + "<|im_end|>\n"
        if add_generation_prompt:
            out += "<|im_start|>assistant\n"
        return Rendered(out, targets)

    def tiny_processor(self, size):
        from transformers import Qwen2VLImageProcessor

        s = SIZES[size]
        pixels = s.image_size * s.image_size
        image_processor = Qwen2VLImageProcessor(
            patch_size=s.patch_size // 2,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": pixels, "longest_edge": pixels},
        )
        return Qwen25VLImageOnlyProcessor(
            image_processor=image_processor, tokenizer=build_tokenizer("qwen2_5_vl")
        )

    def tiny_config(self, tokenizer, size):
        s = SIZES[size]
        head_dim = s.text_hidden // s.heads
        quarter = head_dim // 8  # mrope sections (t, h, w) must sum to head_dim / 2
        vision = dict(
            depth=s.vision_layers,
            hidden_size=s.vision_hidden,
            intermediate_size=2 * s.vision_hidden,
            num_heads=s.heads,
            patch_size=s.patch_size // 2,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=s.text_hidden,
            window_size=s.image_size,
            fullatt_block_indexes=[s.vision_layers - 1],
        )
        text = dict(
            vocab_size=len(tokenizer),
            hidden_size=s.text_hidden,
            intermediate_size=4 * s.text_hidden,
            num_hidden_layers=s.text_layers,
            num_attention_heads=s.heads,
            num_key_value_heads=s.heads,
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

    def load_processor(self, path):
        # Our tiny checkpoints carry the image-only processor; real ones the stock processor.
        if os.path.exists(os.path.join(path, "mllm_cl_image_only_processor")):
            return Qwen25VLImageOnlyProcessor.from_pretrained(path)
        return AutoProcessor.from_pretrained(path)


FAMILIES: dict[str, Family] = {f.name: f for f in (LlavaFamily(), Qwen25VLFamily())}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model.family '{name}' unknown; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]
