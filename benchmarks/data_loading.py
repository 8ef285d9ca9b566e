"""Samples/s of the training data path (decode PIL image + tokenise + collate) with 0/1/2 workers.

Builds the loader TaskStream.train_dataloader builds (the `_Encoded` dataset encoding in the
workers, `Encoder.collate`) with the demo LLaVA processor, and compares it with the model's
step time from benchmarks/step_overhead.py: loading must be faster than training so the
accelerator never waits. Worker start-up is timed separately (first batch).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_loading.py [--batches 40 --batch 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch.utils.data import DataLoader  # noqa: E402

from mllm_cl.data import Synthetic  # noqa: E402
from mllm_cl.data.collate import Encoder  # noqa: E402
from mllm_cl.data.stream import TaskSampler, _Encoded  # noqa: E402
from mllm_cl.families import get_family  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    family = get_family("llava")
    encoder = Encoder(family, family.tiny_processor("demo"), 2048, "skip")
    table = Synthetic("colour", n=1000, seed=1).load()
    n = args.batches * args.batch
    print(f"batch={args.batch} batches={args.batches} (demo processor, 64 px images)")
    for workers in args.workers:
        loader = DataLoader(
            _Encoded(table, encoder.encode_train), batch_size=args.batch,
            sampler=TaskSampler(len(table), n, seed=0), collate_fn=encoder.collate, num_workers=workers,
        )  # fmt: skip
        t0 = time.perf_counter()
        it = iter(loader)
        next(it)
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        count = sum(1 for _ in it)
        rate = count * args.batch / (time.perf_counter() - t1)
        print(f"num_workers={workers}: {rate:8.1f} samples/s steady ({rate / args.batch:6.1f} batches/s), "
              f"first batch {first * 1e3:.0f} ms")  # fmt: skip
    print(
        "reproduce: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_loading.py " + " ".join(sys.argv[1:])
    )


if __name__ == "__main__":
    main()
