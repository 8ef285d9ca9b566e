"""Per-step time of a training step through MLLMModule + Lightning vs a plain PyTorch loop.

Same demo-size LLaVA (same seed), same recipe, optimizer, batch size and data source. Lightning is
timed from on_train_batch_start to on_train_batch_end (forward, loss, logging, backward, AdamW
step, LR schedule; the data loader and the evaluation before/after the task excluded); the raw loop
times the same work on pre-collated batches. The first `--warmup` steps of each are dropped.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_overhead.py [--steps 40 --batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from mllm_cl.data import Synthetic, Task, TaskStream  # noqa: E402
from mllm_cl.data.collate import Encoder  # noqa: E402
from mllm_cl.module import MLLMModule  # noqa: E402
from strategies.freeze import SAProj  # noqa: E402


class StepTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, *args):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, *args):
        self.times.append(time.perf_counter() - self.t0)


def lightning_steps(args, source) -> list[float]:
    L.seed_everything(0)
    module = MLLMModule(family="llava", tiny="demo", recipe=SAProj(), lr=1e-4, warmup_ratio=0.0)
    stream = TaskStream(
        tasks=[Task("t", train=source, eval=source, steps=args.steps)],
        batch_size=args.batch, eval_batch_size=4, eval_limit=4,
    )  # fmt: skip
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer], log_every_n_steps=10,
    )  # fmt: skip
    trainer.fit(module, datamodule=stream)
    return timer.times


def raw_steps(args, source) -> list[float]:
    L.seed_everything(0)
    module = MLLMModule(family="llava", tiny="demo", recipe=SAProj(), lr=1e-4)
    module.configure_model()  # the same model, seed and freezing, without Lightning
    model = module.model.train()
    enc = Encoder(module.family, module.processor, 2048, "skip")
    table = source.load()
    batches = [
        enc.collate([enc.encode_train(table[(i * args.batch + j) % len(table)]) for j in range(args.batch)])
        for i in range(args.steps)
    ]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        loss = model(**{k: v for k, v in batch.items() if k not in ("meta", "skipped")}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # no-op clip, like Lightning's off
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="alternate runs, best median kept")
    args = parser.parse_args()
    source = Synthetic("colour", n=400, seed=1)
    lit, raw = [], []
    for _ in range(args.repeats):  # alternate, so load from other processes hits both alike
        raw.append(statistics.median(raw_steps(args, source)[args.warmup :]))
        lit.append(statistics.median(lightning_steps(args, source)[args.warmup :]))
    r, li = min(raw), min(lit)
    print(f"threads={torch.get_num_threads()} steps={args.steps} warmup={args.warmup} batch={args.batch}")
    print(f"plain PyTorch loop : {r * 1e3:8.2f} ms/step (median)")
    print(f"MLLMModule+Trainer : {li * 1e3:8.2f} ms/step (median)")
    print(f"ratio              : {li / r:.3f}  (target <= 1.05)")
    print(
        "reproduce: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_overhead.py " + " ".join(sys.argv[1:])
    )


if __name__ == "__main__":
    main()
