"""Scaling the model: FSDP2 sharding, the FSDP1 strategy, torch.compile and attention checks.

FSDP2 (recommended): ``trainer.strategy: mllm_cl.sharding.FSDP2``, a ModelParallelStrategy
(configs/trainer_fsdp_multigpu.yaml, configs/trainer_fsdp_multinode.yaml).
`shard_model` runs at the end of `MLLMModule.configure_model`, *after* the recipe froze
parameters, and applies `torch.distributed.fsdp.fully_shard` to every transformer block of the
LLM and the vision tower (the classes of `Family.decoder_layer_classes`), then to the modules HF
calls outside the root's forward (input embeddings, vision tower, projector, language model,
lm_head; see `shard_units`), then to the root HF model, and initialises the root at once. The
root is the HF model, not the LightningModule: `training_step` and `generate` enter the model
through `self.model(...)` (sharding the LightningModule and calling submodules directly fails
with "mixed torch.Tensor and DTensor").

Why FSDP2 for partial fine-tuning: FSDP2 shards *each parameter on its own* (a DTensor per
parameter), so a frozen parameter (``requires_grad=False``) never gets a gradient buffer and the
optimizer only sees trainable shards. FSDP1 flattens all parameters of a wrapped unit into one
flat parameter; with frozen and trainable parameters in one unit (SA Proj: q/k/v/o trainable, MLP
frozen in the same decoder layer) it allocates the gradient of the whole flat parameter, so the
frozen 2/3 of a layer pay full gradient memory (litgpt #1538). `LayerWiseFSDP` (FSDP1, GPU only:
Lightning refuses FSDP1 on CPU) wraps each block with ``use_orig_params=True`` so freezing works,
but keeps that gradient-memory cost.

Requirement for strategies that keep weights (LwF's teacher, WiSE-FT's start point): under FSDP2
``module.model.parameters()`` are DTensors holding this rank's shard. Save clones of the *local
shards* (``p.detach().clone()`` keeps the DTensor, or ``p.to_local().clone()``) taken after
sharding (e.g. in ``on_task_start``, not in ``setup`` which runs before), and merge shard by
shard; never gather full weights on every rank (that costs the full model per GPU).

Activation checkpointing: ``model.gradient_checkpointing: true`` uses HF's non-reentrant
checkpointing per decoder layer, inside each FSDP2 unit; non-reentrant so that frozen embeddings
do not cut the gradient to trainable layers (transformers #23170; tested in tests/test_sharding.py).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from mllm_cl import faults
from mllm_cl.errors import ConfigError
from mllm_cl.results import folder_names, recover_folder, swap_in_folder


def is_dtensor(t) -> bool:
    """A DTensor (an FSDP2 shard) rather than a plain tensor."""
    return hasattr(t, "device_mesh")


def check_attn_implementation(name: str | None) -> None:
    """One-line error when an attention kernel is asked for that is not installed."""
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package (GPU only): "
            "pip install flash-attn --no-build-isolation, or use sdpa"
        )
    if name not in (None, "sdpa", "eager", "flash_attention_2", "flex_attention"):
        raise ConfigError(f"model.attn_implementation={name!r}; use sdpa, eager or flash_attention_2")


def local_log_dir(trainer) -> str | None:
    """`trainer.log_dir` without its broadcast: the run directory is read on rank zero only, and a
    collective entered by one rank hangs a multi-process run."""
    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    return getattr(logger, "log_dir", None) or logger.save_dir


def block_modules(module) -> list[nn.Module]:
    """The transformer blocks of the LLM and the vision tower, in model order."""
    classes = tuple(module.family.decoder_layer_classes(module.model))
    return [m for m in module.model.modules() if isinstance(m, classes)]


def compile_blocks(module) -> int:
    """`torch.compile` each transformer block in place (the model's own forward stays eager).

    Per-block compilation compiles one graph per block class and reuses it for every layer, and
    it composes with FSDP2 (each block is also a sharding unit). Returns the number compiled.
    """
    blocks = block_modules(module)
    for block in blocks:
        block.compile()
    return len(blocks)


def shard_model(module) -> bool:
    """Apply per-model set-up that needs the trainer: compile, then FSDP2 when the strategy asks.

    Called at the end of `MLLMModule.configure_model`. Returns True when FSDP2 was applied.
    """
    if module.hparams.get("compile"):
        compile_blocks(module)
    trainer = module._trainer
    if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
        return False
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = module.device_mesh
    if mesh["tensor_parallel"].size() != 1:
        raise ConfigError(
            "trainer.strategy.tensor_parallel_size must be 1: mllm_cl shards with FSDP2 only "
            "(set data_parallel_size to the number of GPUs)"
        )
    dp_mesh = mesh["data_parallel"]
    # Lightning's bf16-mixed autocasts; keep FSDP's own reduce in fp32 so small LRs survive.
    kwargs = {"mesh": dp_mesh, "mp_policy": MixedPrecisionPolicy(reduce_dtype=torch.float32)}
    flags = _output_capturing_flags(module.model)
    for unit in shard_units(module):
        fully_shard(unit, **kwargs)
    fully_shard(module.model, **kwargs)
    # HF generate calls the vision tower before the root's forward; without this the first unit
    # called would make itself the FSDP root ("FSDP requires running forward through the root").
    fully_shard.state(module.model)._lazy_init()
    _register_output_capturing(flags)
    return True


def _output_capturing_flags(model: nn.Module) -> list[tuple[nn.Module, dict]]:
    from transformers.modeling_utils import PreTrainedModel
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

    return [(m, _CAN_RECORD_REGISTRY.get(m)) for m in model.modules() if isinstance(m, PreTrainedModel)]


def _register_output_capturing(flags: list[tuple[nn.Module, dict]]) -> None:
    """Re-register HF's output-capturing specs under the classes fully_shard created.

    transformers 5 keys `_can_record_outputs` on ``str(model.__class__)``; fully_shard swaps a
    sharded module's class for ``FSDP<Class>``, after which `output_hidden_states=True` silently
    returns None (LLaVA's image features then fail with "'NoneType' object is not subscriptable").
    """
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

    for m, spec in flags:
        if spec and not _CAN_RECORD_REGISTRY.get(m):
            _CAN_RECORD_REGISTRY[m] = spec


def shard_units(module) -> list[nn.Module]:
    """FSDP2 units, children before parents: blocks, the input embeddings, then each component root.

    Besides the blocks, every module that HF calls *outside* the root's forward must be a unit of
    its own, or its parameters would still be sharded when called: `generate` computes image
    features through `get_image_features` (vision tower + projector) and LLaVA's forward embeds
    tokens through `get_input_embeddings()` before entering the language model.
    """
    model = module.model
    depth = {id(m): name.count(".") + (name != "") for name, m in model.named_modules()}
    roots = [m for roots in module.family.component_roots(model).values() for _, m in roots]
    extra = [model.get_input_embeddings(), *roots]
    units, seen = [], set()
    for unit in block_modules(module) + sorted(extra, key=lambda m: -depth[id(m)]):
        if id(unit) not in seen and unit is not model:
            seen.add(id(unit))
            units.append(unit)
    return units


class FSDP2(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as pure FSDP2: data parallel over every device of every node.

    (ModelParallelStrategy's "auto" would make data_parallel_size the node count and use the GPUs
    of a node for tensor parallelism, which mllm_cl does not apply.)

    Args:
        save_distributed_checkpoint: each rank writes its own shard (True) or rank 0 one file (False).
        process_group_backend: "nccl" (GPU) or "gloo" (CPU); None picks by device.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None):
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """A distributed checkpoint is written whole or not at all: every rank writes its shard into
        the hidden sibling `.<name>.partial`, then rank 0 swaps it in for the old folder
        (`mllm_cl.results.swap_in_folder`). Killed while writing (minutes for a 7B model), the run
        resumes from the previous checkpoint, intact, instead of a folder of mixed shards."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = str(self.broadcast(str(filepath)))
        partial, _ = folder_names(path)
        if self.global_rank == 0:
            recover_folder(path)  # a write or swap of this path that a kill cut short
        self.barrier("mllm_cl_checkpoint_start")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("mllm_cl_checkpoint_written")
        faults.point(f"write.{os.path.basename(path)}", path)  # every rank: complete, not yet in place
        if self.global_rank == 0:
            swap_in_folder(path)
        self.barrier("mllm_cl_checkpoint_swapped")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """Resume from a distributed checkpoint that holds only the trainable weights.

        Lightning's loader asks DCP for every parameter of the model and fails on the frozen ones,
        which our checkpoints leave out (they come from the config / pretrained path). Here DCP loads
        what the checkpoint has (`allow_partial_load`), then the optimizer, as Lightning does.
        """
        from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint

        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(checkpoint_path, weights_only)
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        saved = {k.split(".", 1)[1] for k in _dcp_keys(path) if k.startswith("state_dict.")}
        state = {k: v for k, v in get_model_state_dict(self.model).items() if k in saved}
        load({"state_dict": state}, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
        set_model_state_dict(self.model, state, options=StateDictOptions(strict=False))
        for i, optimizer in enumerate(self.optimizers):
            optim = {f"optimizer_{i}": get_optimizer_state_dict(self.model, optimizer)}
            load(optim, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim[f"optimizer_{i}"])
        metadata = torch.load(path / "meta.pt", weights_only=True)  # ours: tensors and plain types only
        metadata["state_dict"] = state  # what was loaded: MLLMModule.on_load_checkpoint checks it
        return metadata


def _dcp_keys(path: Path) -> set[str]:
    """Flattened keys stored in a torch.distributed.checkpoint folder."""
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


class LayerWiseFSDP(FSDPStrategy):
    """FSDP1 wrapping each transformer block of the family, for GPU users (see the module doc).

    Sets ``auto_wrap_policy`` to the family's block classes (LLM decoder layers and vision blocks)
    and ``use_orig_params=True`` so frozen and trainable parameters can share a unit. Caveat: a
    unit that holds any trainable parameter allocates gradients for all of it (litgpt #1538); with
    SA Proj that is the whole decoder layer. Prefer ModelParallelStrategy (FSDP2).

    Args:
        cpu_offload: keep parameters (and gradients) in CPU memory between uses; slower.
        sharding_strategy: FULL_SHARD, SHARD_GRAD_OP, NO_SHARD or HYBRID_SHARD.
        state_dict_type: "full" (rank 0 writes one file; resumes with frozen weights left out) or
            "sharded" (one file per rank; Lightning's FSDP1 loader then expects every weight).
        **kwargs: further arguments of `lightning.pytorch.strategies.FSDPStrategy`.
    """

    def __init__(
        self,
        cpu_offload: bool = False,
        sharding_strategy: str = "FULL_SHARD",
        state_dict_type: str = "full",
        **kwargs,
    ):
        kwargs.setdefault("use_orig_params", True)
        super().__init__(
            cpu_offload=cpu_offload,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            **kwargs,
        )

    def _setup_model(self, model: nn.Module):
        if self.kwargs.get("auto_wrap_policy") is None and hasattr(model, "family"):
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(
                model.family.decoder_layer_classes(model.model)
            )
        return super()._setup_model(model)
