"""Export a standard Hugging Face checkpoint (weights as safetensors + processor + chat template).

What users hand to vLLM or lmms-eval; `LlavaForConditionalGeneration.from_pretrained` /
`Qwen2_5_VLForConditionalGeneration.from_pretrained` load it.
"""

from __future__ import annotations

import copy
import json
import os

import lightning as L
import torch

from mllm_cl.families import EXPORT_RECORD, Family, get_family
from mllm_cl.results import _umask
from mllm_cl.sharding import is_dtensor, local_log_dir
from strategies.lora import LoraLayer, merged_weight


def plain_model(model):
    """`model` itself, or a copy with every LoRA layer merged into its base Linear and unwrapped.

    In-place LoRA (strategies/lora.py) renames weights to ``*.base_layer.weight`` and adds
    ``lora_A/lora_B``; a standard checkpoint must hold plain ``*.weight`` with the update merged.
    The live model is left untouched so training (e.g. the ExportHF callback mid-stream) goes on.
    """
    if not any(isinstance(m, LoraLayer) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]:
        linear = layer.get_base_layer()
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            linear.weight.copy_(merged_weight(linear.weight, a, b, layer.scaling["default"]))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


def is_sharded(model) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def gathered_state_dict(model) -> dict[str, torch.Tensor]:
    """Full weights of an FSDP2-sharded model on rank 0, in CPU memory (other ranks get {}), with
    LoRA folded in. A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]:
        if f"{name}.base_layer.weight" not in state:
            continue  # not rank 0
        a, b = state.pop(f"{name}.lora_A.default.weight"), state.pop(f"{name}.lora_B.default.weight")
        base = state.pop(f"{name}.base_layer.weight")
        state[f"{name}.weight"] = merged_weight(base, a, b, layer.scaling["default"])
        if f"{name}.base_layer.bias" in state:
            state[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
    return state


def export_hf(
    model, processor, out_dir: str, family: Family | str | None = None, state_dict: dict | None = None
) -> str:
    """Write `model` (LoRA merged) and `processor` to `out_dir` in the Hugging Face layout.

    `family` (the module's `Family`, or its name): a processor without a chat template gets the
    family's (`Family.chat_template`, the training format), and `EXPORT_RECORD` notes the family
    options that `Family.load_processor` must restore. Given only a name, the system prompt the
    model was trained with is unknown and not recorded (loading then assumes the released
    checkpoint's), so pass the `Family` itself.
    `state_dict`: the weights to write instead of the model's own (`gathered_state_dict` under FSDP2).
    """
    model = plain_model(model) if state_dict is None else model
    os.makedirs(out_dir, exist_ok=True)
    fam = get_family(family) if isinstance(family, str) else family
    if fam is not None and not getattr(processor, "chat_template", None):
        processor.chat_template = fam.chat_template()
    model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    processor.save_pretrained(out_dir)
    if fam is not None:
        record = fam.export_record(processor, with_system_prompt=isinstance(family, Family))
        with open(os.path.join(out_dir, EXPORT_RECORD), "w") as f:
            json.dump(record, f, indent=2)
    # transformers writes model.safetensors 0600 (a temp file renamed); serving processes and other
    # users must read it: the mode a plain `open` gives (0644 under the usual umask).
    for folder, _, names in os.walk(out_dir):
        for name in names:
            os.chmod(os.path.join(folder, name), 0o666 & ~_umask())
    return out_dir


class ExportHF(L.Callback):
    """Export the model after every task (or only the last) as a Hugging Face checkpoint.

    Args:
        dirpath: where to write; default ``<run dir>/hf``. Each task goes to ``after_<task>``
            unless `last_only`, which writes the final model straight into `dirpath`.
        last_only: export only after the last task.
    """

    def __init__(self, dirpath: str | None = None, last_only: bool = False):
        self.dirpath, self.last_only = dirpath, last_only

    def on_train_epoch_end(self, trainer, pl_module):
        last = trainer.current_epoch == len(trainer.datamodule.tasks) - 1
        if self.last_only and not last:
            return
        # FSDP2: every rank takes part in gathering the shards; rank 0 writes.
        state = gathered_state_dict(pl_module.model) if is_sharded(pl_module.model) else None
        if not trainer.is_global_zero:
            return
        root = self.dirpath or os.path.join(local_log_dir(trainer), "hf")
        name = trainer.datamodule.tasks[trainer.current_epoch].name
        out = root if self.last_only else os.path.join(root, f"after_{name}")
        export_hf(pl_module.model, pl_module.processor, out, pl_module.family, state)
