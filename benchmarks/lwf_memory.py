"""Extra memory of LwF's teacher: bytes of the saved tensors vs the trainable parameters' bytes.

    OMP_NUM_THREADS=1 python benchmarks/lwf_memory.py [--tiny demo] [--family llava]

LwF keeps no second model: it copies only the trainable parameters at task start (strategies/lwf.py).
Target: saved / trainable <= 1.1x. Also prints the whole-model size for scale and one timed LwF step
(student forward + teacher forward + backward) against a plain step.
"""

from __future__ import annotations

import argparse
import time

from mllm_cl.data import Synthetic
from mllm_cl.data.collate import Encoder
from mllm_cl.module import MLLMModule
from strategies import freeze
from strategies.lwf import LwF


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def step_seconds(module, batch, lwf: LwF | None, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = module(batch)
        loss = outputs.loss + (lwf.loss(module.context, batch, outputs) if lwf else 0)
        loss.backward()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llava")
    parser.add_argument("--tiny", default="demo")
    args = parser.parse_args()
    for recipe in ("SAProj", "MLPGateUp", "Full"):
        lwf = LwF()
        module = MLLMModule(
            family=args.family, tiny=args.tiny, recipe=getattr(freeze, recipe)(), strategies=[lwf]
        )
        module.configure_model()
        lwf.on_task_start(module.context, 0)
        trainable = nbytes(p for p in module.model.parameters() if p.requires_grad)
        total = nbytes(module.model.parameters())
        saved = nbytes(lwf.teacher.values())
        encoder = Encoder(module.family, module.processor, 512, "skip")
        samples = Synthetic("count", n=8, seed=1).load()
        batch = encoder.collate([encoder.encode_train(samples[i]) for i in range(8)])
        plain, with_lwf = step_seconds(module, batch, None), step_seconds(module, batch, lwf)
        print(
            f"{args.family}/{args.tiny} {recipe:<9} trainable {trainable / 2**20:7.2f} MiB of {total / 2**20:7.2f} MiB; "
            f"LwF saved {saved / 2**20:7.2f} MiB = {saved / trainable:.2f}x trainable "
            f"({saved / total:.2f}x model); step {plain * 1e3:.0f} ms plain, {with_lwf * 1e3:.0f} ms with LwF"
        )


if __name__ == "__main__":
    main()
