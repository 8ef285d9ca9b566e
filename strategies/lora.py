"""LoRA adapters (Hu et al. 2022) on the modules a recipe selects, merged after every task.

    W' = W + (α / r) · B A,    A ∈ R^{r×in} (Kaiming init), B ∈ R^{out×r} (zeros)

Li et al. use rank 8; LMM_CL uses r 256, α 32, LR 5e-5. Targets are chosen with the recipes'
family-aware canonical patterns (``llm.layers.N.self_attn.q_proj.weight``...), and the exact list of
real module names is passed to peft as `target_modules`, so CLIP's ``self_attn.q_proj`` or
Qwen2.5-VL's ``visual.blocks.N.mlp.gate_proj`` are never wrapped (plain peft suffix matching would).

Adapters are injected in place (`peft.inject_adapter_in_model`): `ctx.model` stays the HF model
and real names only gain ``.lora_A.default.weight`` / ``.lora_B.default.weight``. Only the adapters
train. At each task end B·A is added into W and the adapters are re-initialised in place (same
parameter objects, so the optimizer keeps them), so evaluation and the next task see plain merged
weights (B = 0 adds exactly nothing). The merged W are frozen and thus dropped from checkpoints by
`mllm_cl.checkpointing`, so this strategy's state carries them.
"""

from __future__ import annotations

import math
import re

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from mllm_cl.errors import ConfigError
from mllm_cl.sharding import is_dtensor
from strategies.base import MemoryTerm, Strategy


def merged_weight(
    base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """W + (α/r)·B·A in W's dtype, the product in fp32: the one LoRA merge (task ends, export, the
    gathered FSDP2 export). Works on DTensor shards too (B·A follows W's sharding)."""
    return base + (scaling * (lora_b.float() @ lora_a.float())).to(base.dtype)


def fresh_(weight: torch.Tensor, gen: torch.Generator) -> None:
    """peft's A init (Kaiming uniform, a = √5), drawn at full shape from `gen` then copied in.

    Full shape first, so the new adapters are the same on every rank and under any sharding: under
    FSDP2 `weight` is a DTensor shard, and drawing on it directly would follow the sharded RNG.
    """
    full = torch.empty(weight.shape, dtype=weight.dtype)
    torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
    if is_dtensor(weight):  # DTensor: keep this rank's shard (every rank holds `full`)
        from torch.distributed.tensor import distribute_tensor  # noqa: PLC0415

        mesh = weight.device_mesh
        full = distribute_tensor(full.to(mesh.device_type), mesh, weight.placements, src_data_rank=None)
    weight.copy_(full.to(weight.device))


class LoRA(Strategy):
    """Low-rank adapters on the Linear layers matched by canonical-name patterns.

    Args:
        r: adapter rank.
        alpha: scaling numerator (the update is alpha / r · B A).
        dropout: dropout on the adapter input.
        patterns: regexes over canonical weight names (default: the recipe's patterns, e.g. SAProj's).
        seed: seed of the fresh adapters drawn after each merge.
    """

    reparametrizes_weights = True  # the trainable tensors are A and B, not W

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        patterns: list[str] | None = None,
        seed: int = 0,
    ):
        if r < 1:
            raise ConfigError(f"LoRA(r={r}): r must be >= 1")
        self.r, self.alpha, self.dropout, self.patterns, self.seed = r, alpha, dropout, patterns, seed
        self.model = None
        self.merged: dict[str, torch.Tensor] = {}  # real weight name -> merged base weight

    def targets(self, ctx) -> list[str]:
        """Real names of the nn.Linear modules whose canonical weight name matches the patterns."""
        patterns = self.patterns if self.patterns is not None else list(ctx.recipe.patterns)
        names = ctx.canonical_names()
        linears = {n for n, m in ctx.model.named_modules() if isinstance(m, torch.nn.Linear)}
        found = [
            real[: -len(".weight")]
            for real in names
            if real.endswith(".weight")
            and real[: -len(".weight")] in linears
            and any(re.search(p, names[real]) for p in patterns)
        ]
        if not found:
            raise ConfigError(f"LoRA: patterns {patterns} match no Linear weight of {ctx.family.name}")
        return found

    def setup(self, ctx) -> None:
        targets = self.targets(ctx)
        config = LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets
        )
        inject_adapter_in_model(config, ctx.model)
        for name, p in ctx.model.named_parameters():
            p.requires_grad_(".lora_" in name)
        ctx.parameters_changed()  # new lora_ parameters: canonical names are recomputed
        self.model = ctx.model

    def layers(self) -> dict[str, LoraLayer]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, LoraLayer)}

    def on_task_end(self, ctx, task: int) -> None:
        gen = torch.Generator().manual_seed(self.seed * 1000 + task)
        with torch.no_grad():
            for name, layer in self.layers().items():
                base = layer.get_base_layer().weight
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                base.copy_(merged_weight(base, a, b, layer.scaling["default"]))
                fresh_(layer.lora_A["default"].weight, gen)
                layer.lora_B["default"].weight.zero_()
                self.merged[f"{name}.base_layer.weight"] = base

    def memory(self, plan) -> list[MemoryTerm]:
        shapes = plan.linear_shapes(self.patterns if self.patterns is not None else plan.recipe_patterns)
        n = sum(self.r * (fan_out + fan_in) for fan_out, fan_in in shapes)
        one = plan.sharded(n * plan.weight_bytes)  # adapters are made in their base weight's dtype
        terms = [
            MemoryTerm("LoRA adapters", one, f"{n:,} params: r {self.r} on {len(shapes)} Linear layers"),
            MemoryTerm(
                "LoRA gradients", one, "adapters only: the recipe's weights stay frozen", replaces="gradients"
            ),
            MemoryTerm(
                "LoRA AdamW state", 2 * one, "two moments per adapter parameter", replaces="optimizer"
            ),
        ]
        if self.dropout > 0:  # dropout(x) is a new tensor per target, kept for lora_A's backward
            inputs = sum(fan_in for _, fan_in in shapes)
            live = inputs // plan.layers if plan.gradient_checkpointing else inputs
            note = "a dropped-out copy of each target's input (one layer at a time with checkpointing)"
            terms.append(
                MemoryTerm(
                    "LoRA dropout inputs", plan.micro_batch * plan.seq_len * live * plan.compute_bytes, note
                )
            )
        return terms

    def state_dict(self) -> dict:
        return {"merged": {n: w.detach().clone() for n, w in self.merged.items()}}

    def load_state_dict(self, state: dict) -> None:
        merged = state.get("merged", {})
        if merged and self.model is None:
            raise ConfigError("LoRA: checkpoint has merged weights but the model is not built yet")
        params = dict(self.model.named_parameters()) if self.model is not None else {}
        with torch.no_grad():
            for name, weight in merged.items():
                params[name].copy_(weight)
                self.merged[name] = params[name]
