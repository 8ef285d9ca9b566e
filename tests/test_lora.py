"""LoRA (strategies/lora.py): recipe-pattern targets only, adapter-only optimizer, merge per task,
merged weights in checkpoints; and per-component learning rates (model.component_lr)."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from mllm_cl.data import Synthetic, Task, TaskStream
from mllm_cl.families import get_family
from mllm_cl.module import MLLMModule
from strategies.freeze import Full, MLPGateUp, SAProj
from strategies.lora import LoRA
from tests.helpers import SeenByEval, WeightSnapshots, quiet_trainer

FAMILIES = ["llava", "qwen2_5_vl"]
SA = re.compile(r"^model\.language_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj$")
GATE_UP = re.compile(r"^model\.language_model\.layers\.\d+\.mlp\.(gate|up)_proj$")


def wrapped(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("recipe", "pattern"), [(SAProj, SA), (MLPGateUp, GATE_UP)])
def test_targets_follow_the_recipe_and_skip_the_vision_tower(family, recipe, pattern):
    module = MLLMModule(family=family, recipe=recipe(), strategies=[LoRA(r=4, alpha=8)])
    module.configure_model()
    names = wrapped(module.model)
    layers = module.model.config.text_config.num_hidden_layers
    per_layer = 4 if recipe is SAProj else 2
    assert len(names) == per_layer * layers and all(pattern.match(n) for n in names), names
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {module.component_of(n) for n in trainable} == {"llm"}  # canonical names include the adapters
    optimizer = module.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in module.model.named_parameters() if n in trainable}


def test_plain_peft_suffixes_would_also_wrap_the_vision_tower():
    """Why exact names: peft's suffix matching catches CLIP's q/k/v (and Qwen's vision MLPs)."""
    model, _ = get_family("llava").build_tiny("tiny")
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), model)
    assert any("vision_tower" in n for n in wrapped(model))


def test_adapter_adds_alpha_over_r_times_b_a_and_merges_it():
    """The forward of a wrapped layer is W x + (α / r) · B A x, with α / r = 12 / 4 = 3 worked out
    here (not read from the layer); the task-end merge folds exactly that into W."""
    module = MLLMModule(family="llava", recipe=SAProj(), strategies=[LoRA(r=4, alpha=12)])
    module.configure_model()
    layer = next(m for m in module.model.modules() if isinstance(m, LoraLayer))
    gen = torch.Generator().manual_seed(0)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        b.copy_(torch.randn(b.shape, generator=gen))  # as after some training
    w = layer.get_base_layer().weight.detach().clone()
    bias = layer.get_base_layer().bias
    x = torch.randn(3, w.shape[1], generator=gen)
    want = x @ w.T + 3.0 * (x @ a.detach().T @ b.detach().T) + (0 if bias is None else bias.detach())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    update = 3.0 * b.detach() @ a.detach()
    module.strategies[0].on_task_end(module.context, 0)
    torch.testing.assert_close(layer.get_base_layer().weight.detach(), w + update, rtol=0, atol=1e-6)
    assert not b.any()  # a fresh adapter adds nothing


def test_merge_after_each_task_and_checkpoint(tmp_path):
    L.seed_everything(0)
    probe = SeenByEval()
    lora = LoRA(r=4, alpha=8)
    module = MLLMModule(
        family="qwen2_5_vl", recipe=SAProj(), strategies=[lora, probe], lr=1e-2, warmup_ratio=0.0
    )
    stream = TaskStream(
        tasks=[
            Task("count", train=Synthetic("count", n=16, seed=1, image_size=32), steps=3),
            Task("colour", train=Synthetic("colour", n=16, seed=3, image_size=32), steps=3),
        ],
        batch_size=4,
    )
    snap = WeightSnapshots()
    trainer = quiet_trainer(tmp_path, callbacks=[snap])
    trainer.fit(module, datamodule=stream)
    layers = [
        n[: -len(".lora_A.default.weight")] for n in snap.end[0] if n.endswith(".lora_A.default.weight")
    ]
    assert len(layers) == 4 * module.model.config.text_config.num_hidden_layers
    for task in range(2):
        end, seen = snap.end[task], probe.seen[task]  # before and after the merge
        for name in layers:
            w, a, b = (
                end[f"{name}.{part}.weight"] for part in ("base_layer", "lora_A.default", "lora_B.default")
            )
            assert b.abs().sum() > 0  # the adapter trained
            assert torch.equal(seen[f"{name}.base_layer.weight"], w + (b @ a) * (8 / 4))  # α / r, by hand
            assert not seen[f"{name}.lora_B.default.weight"].any()  # fresh adapter adds nothing
    # Frozen (merged) weights are not in the Lightning state_dict of trainables: the strategy carries them.
    path = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(path)
    fresh = MLLMModule(family="qwen2_5_vl", recipe=SAProj(), strategies=[LoRA(r=4, alpha=8), SeenByEval()])
    fresh.configure_model()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"], strict=False)
    now, restored = dict(module.model.named_parameters()), dict(fresh.model.named_parameters())
    assert all(torch.equal(now[n], restored[n]) for n in now)


def test_component_lr_gives_each_component_its_learning_rate():
    module = MLLMModule(
        family="qwen2_5_vl", recipe=Full(), lr=5e-6, component_lr={"vision": 2e-6, "projector": 1e-5}
    )
    module.configure_model()
    optimizer = module.configure_optimizers()["optimizer"]
    name_of = {id(p): n for n, p in module.model.named_parameters()}
    want = {"vision": 2e-6, "projector": 1e-5, "llm": 5e-6}
    seen = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            component = module.component_of(name_of[id(p)])
            assert group["lr"] == want[component], (name_of[id(p)], group["lr"])
            seen.add(component)
    assert seen == set(want)
