"""Export a standard Hugging Face checkpoint (weights as safetensors + processor + chat template).

What users hand to vLLM or lmms-eval; `LlavaForConditionalGeneration.from_pretrained` /
`Qwen2_5_VLForConditionalGeneration.from_pretrained` load it.
"""

from __future__ import annotations

import os

import lightning as L

from mllm_cl.families import Qwen25VLImageOnlyProcessor


def export_hf(model, processor, out_dir: str) -> str:
    """Write `model` and `processor` to `out_dir` in the Hugging Face layout; returns out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    if isinstance(processor, Qwen25VLImageOnlyProcessor):
        # Tells Qwen25VLFamily.load_processor to rebuild the image-only processor (no torchvision).
        open(os.path.join(out_dir, "mllm_cl_image_only_processor"), "w").close()
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
        if self.last_only and not last or not trainer.is_global_zero:
            return
        root = self.dirpath or os.path.join(trainer.log_dir, "hf")
        name = trainer.datamodule.tasks[trainer.current_epoch].name
        export_hf(
            pl_module.model,
            pl_module.processor,
            root if self.last_only else os.path.join(root, f"after_{name}"),
        )
