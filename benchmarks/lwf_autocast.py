"""The LwF term in fp32 and under a cached bf16 autocast, against a separate teacher model.

    OMP_NUM_THREADS=1 python benchmarks/lwf_autocast.py

Tiny LLaVA, SA Proj, λ 1, T 2, four counting samples; the trainable weights are moved by a seeded
nudge (a stand-in for a few steps) after the teacher snapshot. Before the fix in strategies/lwf.py
(teacher pass under `uncached_autocast`) the autocast term was exactly 0.0: the in-place weight
exchange kept the tensors' identity, so autocast's weight cache served the student's bf16 casts to
the teacher pass. Measured: 0.021340 fp32, 0.000000 bf16 before; 0.021340 fp32, 0.021415 bf16 after
(the separate teacher under the same autocast: 0.021415).
"""

from __future__ import annotations

import copy

import torch

from mllm_cl.data import Synthetic
from mllm_cl.data.collate import Encoder
from mllm_cl.module import MLLMModule
from strategies.freeze import SAProj
from strategies.lwf import LwF, answer_logits, distillation


def main() -> None:
    module = MLLMModule(family="llava", recipe=SAProj())
    module.configure_model()
    lwf = LwF(lam=1.0, temperature=2.0)
    lwf.on_task_start(module.context, 0)
    teacher = copy.deepcopy(module.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    encoder = Encoder(module.family, module.processor, 512, "skip")
    samples = Synthetic("count", n=4, seed=1, image_size=32).load()
    batch = encoder.collate([encoder.encode_train(samples[i]) for i in range(4)])
    module.model.eval()
    fp32 = lwf.loss(module.context, batch, module(batch)).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = module(batch)
        ours = lwf.loss(module.context, batch, outputs).item()
        with torch.no_grad():
            t = teacher(**{k: v for k, v in batch.items() if k != "skipped"}).logits
        labels = batch["labels"]
        reference = distillation(answer_logits(outputs.logits, labels), answer_logits(t, labels), 2.0).item()
    print(f"LwF term: fp32 {fp32:.6f} | bf16 autocast {ours:.6f} | bf16, separate teacher {reference:.6f}")


if __name__ == "__main__":
    main()
