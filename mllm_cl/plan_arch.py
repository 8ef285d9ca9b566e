"""Shapes of a model for ``python -m mllm_cl plan``: the real architecture built on the meta device.

A ``config.json`` (a file, a checkpoint folder, a Hugging Face cache entry or a bundled 7B config,
`bundled_configs()`) is turned into the family's model class on the meta device (no weights, no
memory, no download); the recipe is applied by canonical name exactly as `Recipe.setup` does.
Bundled configs: each family's `Family.bundled_config` (``llava-1.5-7b-hf``,
``qwen2.5-vl-7b-instruct``, ``llava-onevision-qwen2-7b-ov-hf``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import torch
from huggingface_hub import try_to_load_from_cache

from mllm_cl.errors import ConfigError
from mllm_cl.families import COMPONENTS
from mllm_cl.sharding import shard_units


def bundled_configs() -> dict[str, Path]:
    """Name (file stem) -> path of the config.json copies shipped in ``mllm_cl/model_configs``."""
    root = resources.files("mllm_cl").joinpath("model_configs")
    return {Path(f.name).stem: Path(str(f)) for f in root.iterdir() if f.name.endswith(".json")}


def resolve_config_path(config_path: str) -> Path:
    """A JSON file, a checkpoint directory holding ``config.json``, or a bundled config's name."""
    path = Path(config_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return path
    bundled = bundled_configs()
    if config_path.removesuffix(".json") in bundled:
        return bundled[config_path.removesuffix(".json")]
    raise ConfigError(
        f"config {config_path!r} not found (a config.json, a folder holding one, or one of {sorted(bundled)})"
    )


def checkpoint_config(pretrained: str) -> Path | None:
    """The config.json of `model.pretrained` without downloading: a local folder, the bundled copy
    of a known hub checkpoint (matched by its name), or the Hugging Face cache; None if none."""
    local = Path(pretrained) / "config.json"
    if local.is_file():
        return local
    bundled = bundled_configs().get(pretrained.rsplit("/", 1)[-1].lower())
    if bundled is not None:
        return bundled
    if re.fullmatch(r"[\w.-]+/[\w.-]+", pretrained) and not Path(pretrained).exists():  # a hub id
        cached = try_to_load_from_cache(pretrained, "config.json")
        if isinstance(cached, str):
            return Path(cached)
    return None


def load_config(family, config_path: str):
    """The family's HF config class built from a config.json (transformers 5.x converts legacy rope keys)."""
    path = resolve_config_path(config_path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a valid config.json ({err})") from err
    config_class = family.model_class.config_class
    if data.get("model_type", config_class.model_type) != config_class.model_type:
        raise ConfigError(
            f"{path} is a {data['model_type']!r} config, family {family.name!r} needs {config_class.model_type!r}"
        )
    return config_class(**data)


def build_meta_model(family, config):
    """The real architecture with parameters on the meta device (shapes only)."""
    with torch.device("meta"):
        return family.model_class(config)


def count_parameters(family, model, recipe) -> dict[str, dict[str, int]]:
    """component -> {"trainable", "total"}, plus "all"; trainable = `recipe.selects(canonical name)`."""
    names = family.canonical_names(model)
    recipe.resolve(names.values())  # patterns that depend on the model (LastLayers)
    counts = {c: {"trainable": 0, "total": 0} for c in (*COMPONENTS, "all")}
    for real, param in model.named_parameters():
        canonical = names[real]
        for key in (canonical.split(".", 1)[0], "all"):
            counts[key]["total"] += param.numel()
            if recipe.selects(canonical):
                counts[key]["trainable"] += param.numel()
    if counts["all"]["trainable"] == 0:
        raise ConfigError(
            f"recipe {type(recipe).__name__} (patterns {list(recipe.patterns)}) matches no parameter of {family.name}"
        )
    return counts


@dataclass
class Arch:
    """Shapes of one architecture, read from its meta-device model (no weights)."""

    params: dict  # component -> {"trainable", "total"}, plus "all"
    layers: int
    hidden: int
    heads: int
    vocab: int
    linears: dict  # canonical weight name -> (out_features, in_features) of every nn.Linear
    layer_linears: int  # Linear weights of the largest LLM decoder layer
    head_linears: int  # lm_head
    llm_linears: int  # every LLM Linear weight, lm_head included
    units_fsdp1: list  # (params, trainable) per FSDP1 unit: the blocks, then the root
    units_fsdp2: list  # (params, trainable) per FSDP2 unit (mllm_cl.sharding.shard_units)
    image_bytes: int | None  # one image's fp32 pixel tensor as the processor makes it


def _units(model, units, trainable: set[int]) -> list[tuple[int, int]]:
    """(params, trainable) per unit; a parameter belongs to the innermost unit holding it."""
    owner = {}
    for unit in [model, *reversed(units)]:  # children come before parents in `units`
        for p in unit.parameters():
            owner[id(p)] = id(unit)
    out = {id(u): [0, 0] for u in [model, *units]}
    for p in model.parameters():
        out[owner[id(p)]][0] += p.numel()
        out[owner[id(p)]][1] += p.numel() * (id(p) in trainable)
    return [tuple(v) for v in out.values() if v[0]]


def _image_bytes(config, processor_kwargs: dict) -> int | None:
    """fp32 pixel values of one image: fixed-size towers from their config (anyres: one tile per
    grid cell of the largest pinpoint, plus the base image); Qwen-style patch towers from max_pixels."""
    vision = config.vision_config
    if getattr(vision, "temporal_patch_size", None):  # pixels flattened into patches, frames repeated
        pixels = processor_kwargs.get("max_pixels")
        return None if pixels is None else pixels * 3 * vision.temporal_patch_size * 4
    side = getattr(vision, "image_size", None)
    if side is None:
        return None
    grid = getattr(config, "image_grid_pinpoints", None) or []
    tiles = 1 + max((w * h // side**2 for w, h in grid), default=0)
    return tiles * 3 * side * side * 4


def arch_of(family, config, model, recipe, processor_kwargs: dict | None = None) -> Arch:
    """The shapes `estimate` needs, read once from the meta model."""
    names = family.canonical_names(model)
    params = count_parameters(family, model, recipe)
    trainable = {id(p) for real, p in model.named_parameters() if recipe.selects(names[real])}
    linears = {
        names[f"{mod}.weight" if mod else "weight"]: (m.out_features, m.in_features)
        for mod, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    per_layer: dict[str, int] = {}
    for name, (o, i) in linears.items():
        layer = re.match(r"llm\.layers\.(\d+)\.", name)
        if layer:
            per_layer[layer[1]] = per_layer.get(layer[1], 0) + o * i
    head = sum(o * i for n, (o, i) in linears.items() if n.startswith("llm.lm_head."))
    blocks_of = family.decoder_layer_classes(model)
    blocks = [m for m in model.modules() if isinstance(m, tuple(blocks_of))]
    text = config.get_text_config()
    return Arch(
        params=params,
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        heads=text.num_attention_heads,
        vocab=text.vocab_size,
        linears=linears,
        layer_linears=max(per_layer.values(), default=0),
        head_linears=head,
        llm_linears=sum(o * i for n, (o, i) in linears.items() if n.startswith("llm.")),
        units_fsdp1=_units(model, blocks, trainable),
        units_fsdp2=_units(model, shard_units(SimpleNamespace(model=model, family=family)), trainable),
        image_bytes=_image_bytes(config, processor_kwargs or {}),
    )
