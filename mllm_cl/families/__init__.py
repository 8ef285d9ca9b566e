"""Model families: everything that differs between LLaVA-1.5, Qwen2.5-VL and LLaVA-OneVision.

One file per family (`llava`, `qwen2_5_vl`, `llava_onevision`) subclasses `Family` (`base`): its
component roots, chat format (`chat.ChatFormat`, rendered for training and as the exported chat
template), tiny config and tokenizer specials, bundled 7B config and processor quirks. Adding a
family = one file here plus its entry in `FAMILIES` (see the README, "Adding a model family").
"""

from __future__ import annotations

import inspect

from mllm_cl.errors import ConfigError
from mllm_cl.families.base import COMPONENTS, EXPORT_RECORD, Family, ImageOnlyProcessorMixin
from mllm_cl.families.chat import ChatFormat, Rendered
from mllm_cl.families.llava import LlavaFamily
from mllm_cl.families.llava_onevision import LlavaOnevisionFamily, LlavaOnevisionImageOnlyProcessor
from mllm_cl.families.qwen2_5_vl import Qwen25VLFamily, Qwen25VLImageOnlyProcessor

FAMILIES: dict[str, type[Family]] = {
    cls.name: cls for cls in (LlavaFamily, Qwen25VLFamily, LlavaOnevisionFamily)
}


def get_family(name: str, options: dict | None = None) -> Family:
    """A new adapter of family `name`; `options` are its ``__init__`` arguments
    (``system_prompt``, ``processor_kwargs``: the YAML's ``model.family_options``)."""
    if name not in FAMILIES:
        raise ValueError(f"model.family '{name}' unknown; choose one of {sorted(FAMILIES)}")
    cls = FAMILIES[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options or {}) - accepted)
    if unknown:
        raise ConfigError(f"model.family_options: {unknown} unknown; family {name} takes {sorted(accepted)}")
    return cls(**(options or {}))


__all__ = [
    "COMPONENTS",
    "EXPORT_RECORD",
    "FAMILIES",
    "ChatFormat",
    "Family",
    "ImageOnlyProcessorMixin",
    "LlavaFamily",
    "LlavaOnevisionFamily",
    "LlavaOnevisionImageOnlyProcessor",
    "Qwen25VLFamily",
    "Qwen25VLImageOnlyProcessor",
    "Rendered",
    "get_family",
]
