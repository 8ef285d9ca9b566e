"""Samples/s of the training data path (decode PIL image + tokenise + collate) with 0/1/2 workers.

Builds the loader TaskStream.train_dataloader builds (the `_Encoded` dataset encoding in the
workers, `Encoder.collate`) with the demo LLaVA processor, and compares it with the model's
step time from benchmarks/step_overhead.py: loading must be faster than training so the
accelerator never waits. Worker start-up is timed separately (first batch). The same loaders
are then timed over the processed-data cache (`data.cache_processed`: tokens read from Arrow,
only the image processor runs), after timing the one-off build of that cache.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_loading.py [--batches 40 --batch 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch.utils.data import DataLoader  # noqa: E402

from mllm_cl.data import Synthetic  # noqa: E402
from mllm_cl.data.cache import tokenized  # noqa: E402
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
        time_loader(table, encoder, n, args.batch, workers, "tokenise")
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        cached = tokenized(table, encoder, Path(root), num_workers=max(args.workers))
        print(
            f"cache build ({len(table)} samples, {max(args.workers)} workers): {time.perf_counter() - t0:.1f} s"
        )
        for workers in args.workers:
            time_loader(cached, encoder, n, args.batch, workers, "cached")
    print(
        "reproduce: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_loading.py " + " ".join(sys.argv[1:])
    )


def time_loader(table, encoder, n: int, batch: int, workers: int, label: str) -> None:
    loader = DataLoader(
            _Encoded(table, encoder.encode_train), batch_size=batch,
            sampler=TaskSampler(len(table), n, seed=0), collate_fn=encoder.collate, num_workers=workers,
    )  # fmt: skip
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    count = sum(1 for _ in it)
    rate = count * batch / (time.perf_counter() - t1)
    print(f"{label:8s} num_workers={workers}: {rate:8.1f} samples/s steady ({rate / batch:6.1f} batches/s), "
          f"first batch {first * 1e3:.0f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
