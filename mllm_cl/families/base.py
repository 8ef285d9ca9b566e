"""The `Family` base class: what every model family file fills in.

A family adapter knows the HF class, the processor, the chat format, where the vision tower,
projector and language model live, and the decoder-layer classes (FSDP wrap and activation
checkpointing policies need them). The rest of the toolkit speaks only in *canonical names*:
``<component>.<name inside the component>`` with components ``vision``, ``projector`` and ``llm``
(``llm`` = the language model plus ``lm_head``). Recipes are regexes over canonical names, so
``^llm\\.layers\\.\\d+\\.mlp\\.gate_proj`` can never match Qwen2.5-VL's ``visual.blocks.N.mlp.gate_proj``
and ``^llm\\..*self_attn`` never matches CLIP's ``self_attn``.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from transformers import AutoProcessor

from mllm_cl.errors import ConfigError
from mllm_cl.families.chat import ChatFormat, Rendered
from mllm_cl.tiny import SIZES, TinySize, TokenizerSpecials, build_tokenizer

COMPONENTS = ("vision", "projector", "llm")
# Written by `export_hf` next to the weights: which family options the checkpoint was trained with.
EXPORT_RECORD = "mllm_cl_family.json"
_LEGACY_IMAGE_ONLY_MARK = "mllm_cl_image_only_processor"  # exports made before EXPORT_RECORD


class ImageOnlyProcessorMixin:
    """A multimodal processor built without its video processor.

    Stock processors insist on a video processor, and video processors need torchvision, which a
    CPU environment cannot have (its wheels are CUDA builds). Images are all we train on. Put it
    before the stock class: ``class X(ImageOnlyProcessorMixin, StockProcessor)``; reload with X.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


class Family:
    """Base adapter; a family file subclasses it and fills the class attributes and hooks below.

    Args:
        system_prompt: the default system message, rendered when a conversation has none. "auto"
            uses the prompt the weights were trained with: `checkpoint_system_prompt` for a
            released checkpoint, `tiny_system_prompt` for a tiny model built from random weights,
            and what `export_hf` recorded for a checkpoint mllm_cl exported. A string sets it;
            None renders no system turn.
        processor_kwargs: processor options (keys in `processor_options`), applied by
            `configure_processor` to a checkpoint's processor and to a tiny model's alike.
    """

    name: str
    model_class: type
    chat: ChatFormat
    bundled_config: str  # file stem in mllm_cl/model_configs: `plan`'s default 7B config
    tiny_specials: TokenizerSpecials
    checkpoint_system_prompt: str | None = None
    tiny_system_prompt: str | None = None
    processor_options: tuple[str, ...] = ()
    image_only_processor: type | None = None  # tiny processors' class, reloaded from our exports
    # Processor outputs stacked per batch (besides token tensors); `batch_images` joins them.
    image_keys: tuple[str, ...] = ("pixel_values", "image_grid_thw", "image_sizes")

    def __init__(self, system_prompt: str | None = "auto", processor_kwargs: dict | None = None):
        unknown = sorted(set(processor_kwargs or {}) - set(self.processor_options))
        if unknown:
            raise ConfigError(
                f"model.family_options.processor_kwargs: {unknown} not taken by family {self.name}; "
                f"use {list(self.processor_options) or 'none'}"
            )
        self.system_option = system_prompt
        self.processor_kwargs = dict(processor_kwargs or {})
        self._weights_prompt = self.tiny_system_prompt  # until load_processor reads a checkpoint

    # ---- text --------------------------------------------------------------------------------
    @property
    def image_placeholder(self) -> str:
        """What one image becomes in the rendered text before the processor expands it."""
        return self.chat.image

    @property
    def end_of_turn(self) -> str:
        """Appended to every answer so the model learns to stop; generation stops on it."""
        return self.chat.end_of_turn

    @property
    def system_prompt(self) -> str | None:
        """The default system message in effect (the "auto" option resolved)."""
        return self._weights_prompt if self.system_option == "auto" else self.system_option

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
        return self.chat.render(messages, add_generation_prompt, self.system_prompt)

    def chat_template(self) -> str:
        """`render` as a Jinja chat template (shipped with tiny processors and exports)."""
        return self.chat.jinja(self.system_prompt)

    def image_token_id(self, processor) -> int:
        return processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    # ---- parts -------------------------------------------------------------------------------
    def component_roots(self, model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
        """component -> [(prefix inside the component, module)]; later entries win on overlap."""
        raise NotImplementedError

    def component_params(self, model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """component -> [(name, parameter)] for parameters held directly by a module outside every
        root (LLaVA-OneVision's ``image_newline``)."""
        return {}

    def canonical_names(self, model: nn.Module) -> dict[str, str]:
        """Map every parameter's real name to its canonical ``component.name``."""
        owner: dict[int, str] = {}
        for comp, roots in self.component_roots(model).items():
            for prefix, root in roots:
                for name, param in root.named_parameters():
                    owner[id(param)] = f"{comp}.{prefix}{name}"
        for comp, params in self.component_params(model).items():
            for name, param in params:
                owner[id(param)] = f"{comp}.{name}"
        names = {}
        for real, param in model.named_parameters():
            if id(param) not in owner:
                raise RuntimeError(
                    f"{self.name}: parameter {real} belongs to no component; update the family file"
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

    # ---- batching ----------------------------------------------------------------------------
    def batch_images(self, key: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """Join one image tensor (`image_keys`) of several encoded samples into a batch."""
        return torch.cat(parts)

    # ---- building ----------------------------------------------------------------------------
    def tiny_config(self, tokenizer, size: TinySize):
        """The HF config of a tiny model with `tokenizer`'s vocabulary."""
        raise NotImplementedError

    def tiny_image_processor(self, size: TinySize):
        """The image processor of a tiny model."""
        raise NotImplementedError

    def tiny_processor_from_parts(self, image_processor, tokenizer, size: TinySize):
        """The processor of a tiny model around its image processor and tokenizer."""
        raise NotImplementedError

    def tiny_processor(self, size: str):
        """The offline processor of a tiny model, with `render` as its chat template."""
        s = _size(size)
        self._weights_prompt = self.tiny_system_prompt
        tokenizer = build_tokenizer(self.tiny_specials)
        processor = self.tiny_processor_from_parts(self.tiny_image_processor(s), tokenizer, s)
        processor.chat_template = self.chat_template()
        self.configure_processor(processor)
        return processor

    def build_tiny(self, size: str = "tiny", seed: int = 0):
        """A randomly initialised model of the real architecture and its offline processor."""
        processor = self.tiny_processor(size)
        config = self.tiny_config(processor.tokenizer, _size(size))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = self.model_class(config)
        return model, processor

    def load_processor(self, path: str):
        """The processor of a checkpoint; also settles what "auto" system prompt it was trained with."""
        record = read_export_record(path)
        self._weights_prompt = record.get("system_prompt", self.checkpoint_system_prompt)
        image_only = record.get("image_only_processor") or os.path.exists(
            os.path.join(path, _LEGACY_IMAGE_ONLY_MARK)
        )
        cls = self.image_only_processor if image_only and self.image_only_processor else AutoProcessor
        processor = cls.from_pretrained(path)
        self.configure_processor(processor)
        return processor

    def configure_processor(self, processor) -> None:
        """Apply `processor_kwargs` to a built or loaded processor (families with `processor_options`)."""

    def load(self, path: str, dtype: torch.dtype, attn_implementation: str | None, trust_remote_code: bool):
        """Load real weights from a local directory or hub id."""
        kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        return self.model_class.from_pretrained(path, **kwargs)

    def export_record(self, processor, with_system_prompt: bool = True) -> dict:
        """What `export_hf` writes to `EXPORT_RECORD`, read back by `load_processor`."""
        record = {"family": self.name}
        if with_system_prompt:
            record["system_prompt"] = self.system_prompt
        if self.image_only_processor and isinstance(processor, self.image_only_processor):
            record["image_only_processor"] = True  # reload with our class, not AutoProcessor
        return record


def read_export_record(path: str) -> dict:
    file = os.path.join(path, EXPORT_RECORD)
    if not os.path.isfile(file):
        return {}
    try:
        return json.loads(open(file).read())
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{file}: not valid JSON ({err}); re-export the checkpoint or delete the file"
        ) from err


def _size(size: str) -> TinySize:
    if size not in SIZES:
        raise ValueError(f"tiny size '{size}' unknown; choose one of {sorted(SIZES)}")
    return SIZES[size]
