"""Freezing recipes on real tiny LLaVA / Qwen2.5-VL models.

The expected trainable set of every recipe is computed here from the HF module structure
(`model.model.language_model.layers[i].self_attn.q_proj`, `model.model.visual.merger`, ...), not
from canonical names, so a wrong canonical mapping or regex shows up as a set difference.
"""

from __future__ import annotations

import pytest

from mllm_cl.errors import ConfigError
from mllm_cl.module import MLLMModule
from strategies.freeze import (
    LLM,
    MLP,
    SAQKV,
    SAVO,
    Full,
    LastLayers,
    MLPDown,
    MLPGateUp,
    Patterns,
    Projector,
    SAProj,
    SAProjGateUp,
    VisionEncoder,
)
from tests.conftest import FAMILY_NAMES


def names_of(model, *modules, minus=()) -> set[str]:
    """Real parameter names of `modules` (minus those of `minus`), looked up by identity."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    keep = {id(p) for m in modules for p in m.parameters()}
    drop = {id(p) for m in minus for p in m.parameters()}
    return {by_id[i] for i in keep - drop}


def components(model, family: str) -> dict[str, set[str]]:
    """vision / projector / llm real-name sets from the HF module structure."""
    inner = model.model
    if family == "llava":
        vision = names_of(model, inner.vision_tower)
        projector = names_of(model, inner.multi_modal_projector)
    else:
        vision = names_of(model, inner.visual, minus=[inner.visual.merger])
        projector = names_of(model, inner.visual.merger)
    llm = names_of(model, inner.language_model, model.lm_head)
    return {"vision": vision, "projector": projector, "llm": llm}


def layer_parts(model, attr: str, parts: list[str]) -> set[str]:
    layers = model.model.language_model.layers
    return names_of(model, *[getattr(getattr(layer, attr), p) for layer in layers for p in parts])


def expected(recipe_name: str, model, family: str) -> set[str]:
    comps = components(model, family)
    lm = model.model.language_model
    if recipe_name == "Full":
        return {n for n, _ in model.named_parameters()}
    if recipe_name == "VisionEncoder":
        return comps["vision"]
    if recipe_name == "Projector":
        return comps["projector"]
    if recipe_name == "LLM":
        return comps["llm"]
    if recipe_name == "SAProj":
        return layer_parts(model, "self_attn", ["q_proj", "k_proj", "v_proj", "o_proj"])
    if recipe_name == "MLP":
        return layer_parts(model, "mlp", ["gate_proj", "up_proj", "down_proj"])
    if recipe_name == "MLPGateUp":
        return layer_parts(model, "mlp", ["gate_proj", "up_proj"])
    if recipe_name == "SAQKV":
        return layer_parts(model, "self_attn", ["q_proj", "k_proj", "v_proj"])
    if recipe_name == "SAVO":
        return layer_parts(model, "self_attn", ["v_proj", "o_proj"])
    if recipe_name == "MLPDown":
        return layer_parts(model, "mlp", ["down_proj"])
    if recipe_name == "SAProjGateUp":
        return layer_parts(model, "self_attn", ["q_proj", "k_proj", "v_proj", "o_proj"]) | layer_parts(
            model, "mlp", ["gate_proj", "up_proj"]
        )
    if recipe_name == "LastLayers1":
        return names_of(model, lm.layers[-1])
    if recipe_name == "LastLayers1MLP":
        return names_of(model, lm.layers[-1].mlp)
    if recipe_name == "PatternsLayer1":
        last = lm.layers[1]
        return names_of(model, last, minus=[last.input_layernorm, last.post_attention_layernorm])
    if recipe_name == "PatternsProjHead":
        return comps["projector"] | names_of(model, model.lm_head)
    raise AssertionError(recipe_name)


RECIPES = {
    "Full": Full,
    "VisionEncoder": VisionEncoder,
    "Projector": Projector,
    "LLM": LLM,
    "SAProj": SAProj,
    "MLP": MLP,
    "MLPGateUp": MLPGateUp,
    "SAQKV": SAQKV,
    "SAVO": SAVO,
    "MLPDown": MLPDown,
    "SAProjGateUp": SAProjGateUp,
    "LastLayers1": lambda: LastLayers(1),
    "LastLayers1MLP": lambda: LastLayers(1, within=r"mlp\."),
    "PatternsLayer1": lambda: Patterns([r"^llm\.layers\.1\."], exclude=["norm"]),
    "PatternsProjHead": lambda: Patterns([r"^projector\.", r"^llm\.lm_head\."]),
}


def build(family: str, recipe, **kwargs) -> MLLMModule:
    module = MLLMModule(family=family, tiny="tiny", recipe=recipe, **kwargs)
    module.configure_model()  # builds the model and applies the recipe: the real path
    return module


def trainable(module) -> set[str]:
    return {n for n, p in module.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_components_partition_the_model(family):
    module = build(family, Full())
    comps = components(module.model, family)
    everything = {n for n, _ in module.model.named_parameters()}
    assert comps["vision"] | comps["projector"] | comps["llm"] == everything
    assert not comps["vision"] & comps["projector"]
    assert not comps["llm"] & (comps["vision"] | comps["projector"])
    # The canonical mapping agrees with the structure.
    for real, canonical in module.canonical_names().items():
        assert real in comps[canonical.split(".", 1)[0]], (real, canonical)


@pytest.mark.parametrize("recipe_name", list(RECIPES))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_recipe_trains_exactly_the_expected_parameters(family, recipe_name):
    module = build(family, RECIPES[recipe_name]())
    want = expected(recipe_name, module.model, family)
    assert want, "expected set must not be empty"
    got = trainable(module)
    assert got == want, f"extra {sorted(got - want)[:5]}, missing {sorted(want - got)[:5]}"

    # Idempotent: applying it again, or after another recipe, gives the same set.
    module.recipe.setup(module.context)
    assert trainable(module) == want
    Full().setup(module.context)
    module.recipe.setup(module.context)
    assert trainable(module) == want


@pytest.mark.parametrize("recipe_name", list(RECIPES))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_param_counts_and_optimizer_follow_the_recipe(family, recipe_name):
    module = build(family, RECIPES[recipe_name]())
    model = module.model
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    want = expected(recipe_name, model, family)
    comps = components(model, family)
    for comp, names in comps.items():
        assert module.param_counts[comp] == {
            "total": sum(sizes[n] for n in names),
            "trainable": sum(sizes[n] for n in names & want),
        }, comp
    assert module.param_counts["total"] == {
        "total": sum(sizes.values()),
        "trainable": sum(sizes[n] for n in want),
    }

    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    in_optimizer = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(in_optimizer) == len(set(in_optimizer)), "a parameter is in two groups"
    by_name = dict(model.named_parameters())
    assert set(in_optimizer) == {id(by_name[n]) for n in want}


def test_saproj_leaves_clip_attention_frozen():
    module = build("llava", SAProj())
    params = dict(module.model.named_parameters())
    clip_q = [n for n in params if n.startswith("model.vision_tower.") and ".self_attn.q_proj." in n]
    assert clip_q, "tiny CLIP must have self_attn.q_proj"
    assert not any(params[n].requires_grad for n in clip_q)
    assert params["model.language_model.layers.0.self_attn.q_proj.weight"].requires_grad


def test_mlp_gate_up_leaves_qwen_vision_mlp_and_down_proj_frozen():
    module = build("qwen2_5_vl", MLPGateUp())
    params = dict(module.model.named_parameters())
    vision_gate = [n for n in params if n.startswith("model.visual.blocks.") and ".mlp.gate_proj." in n]
    assert vision_gate, "tiny Qwen vision blocks must have mlp.gate_proj"
    assert not any(params[n].requires_grad for n in vision_gate)
    down = [n for n in params if ".mlp.down_proj." in n]
    assert down and not any(params[n].requires_grad for n in down)
    for part in ("gate_proj", "up_proj"):
        assert params[f"model.language_model.layers.1.mlp.{part}.weight"].requires_grad


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_component_lr_groups_split_by_component(family):
    module = build(family, Full(), lr=1e-3, component_lr={"vision": 2e-4})
    comps = components(module.model, family)
    by_name = dict(module.model.named_parameters())
    groups = {
        g["lr"]: {id(p) for p in g["params"]} for g in module.configure_optimizers()["optimizer"].param_groups
    }
    assert groups.keys() == {1e-3, 2e-4}
    assert groups[2e-4] == {id(by_name[n]) for n in comps["vision"]}
    assert groups[1e-3] == {id(by_name[n]) for n in comps["projector"] | comps["llm"]}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_recipe_matching_nothing_is_a_one_line_config_error(family):
    module = MLLMModule(family=family, tiny="tiny", recipe=Patterns(["^nothing"]))
    with pytest.raises(ConfigError) as info:
        module.configure_model()
    message = str(info.value)
    assert "\n" not in message
    assert "Patterns" in message and "^nothing" in message and family in message


def test_last_layers_counts_the_family_layers_and_refuses_too_many():
    module = build("llava", LastLayers(2))
    layers = module.model.model.language_model.layers
    assert len(layers) == 2  # the tiny LLaVA: both layers, nothing else
    assert trainable(module) == names_of(module.model, *layers)
    with pytest.raises(ConfigError, match="has 2 decoder layers"):
        build("llava", LastLayers(3))
    with pytest.raises(ConfigError, match="n must be"):
        LastLayers(0)


def test_plan_counts_last_layers_like_the_real_recipe():
    from mllm_cl.plan import count_parameters

    module = build("llava", LastLayers(1, within=r"self_attn\."))
    counts = count_parameters(module.family, module.model, LastLayers(1, within=r"self_attn\."))
    assert counts["all"]["trainable"] == module.param_counts["total"]["trainable"] > 0
    from mllm_cl.plan import make_recipe

    with pytest.raises(ConfigError, match="needs arguments"):
        make_recipe("LastLayers", None, None)
