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
from strategies.base import Strategy
from strategies.freeze import Full, MLPGateUp, SAProj
from strategies.lora import LoRA
from tests.helpers import quiet_trainer

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


class Snap(L.Callback):
    """Base weight + adapters of every LoRA layer at each task's end, before the merge."""

    def __init__(self):
        self.before = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.before.append(
            {
                n: (
                    m.get_base_layer().weight.detach().clone(),
                    m.lora_A["default"].weight.detach().clone(),
                    m.lora_B["default"].weight.detach().clone(),
                    m.scaling["default"],
                )
                for n, m in pl_module.model.named_modules()
                if isinstance(m, LoraLayer)
            }
        )


class SeenByEval(Strategy):
    def __init__(self):
        self.seen = []

    def on_task_end(self, module, task):
        self.seen.append({n: p.detach().clone() for n, p in module.model.named_parameters()})


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
    snap = Snap()
    trainer = quiet_trainer(tmp_path, callbacks=[snap])
    trainer.fit(module, datamodule=stream)
    for task in range(2):
        for name, (w, a, b, scaling) in snap.before[task].items():
            assert b.abs().sum() > 0  # the adapter trained
            merged = probe.seen[task][f"{name}.base_layer.weight"]
            assert torch.equal(merged, w + (b @ a) * scaling)
            assert not probe.seen[task][f"{name}.lora_B.default.weight"].any()  # fresh adapter adds nothing
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
