"""Data at the papers' scale: a LLaVA-format source of N records (10k / 100k / 665k), as LLaVA-665k.

Generates, once per N (under --root), a LLaVA conversation JSON list shaped like
`llava_v1_5_mix665k.json`: 1-5 turns per record (about 1 KB each), 5 % text-only, one small PNG
per image record in folders of 1000 (as coco/train2017/...). Then, each in a fresh process (so
peak RSS is that step's alone):

- load (cold / warm): ``LlavaJson(path).load()`` with an empty cache, then again with it;
- loader: one training loader over the source (batch 8, 2 workers, tokenising on the fly) for
  --loader-samples samples: its rate, the epoch time that rate gives for N samples
  (extrapolated), and the peak USS of each worker (private memory, not the shared pages);
- build (with --steps build): the processed-data cache of the whole source (tiny LLaVA encoder, 2
  workers): samples/s and how much the process's peak RSS grows while building;
- fit (cold / warm): a tiny-LLaVA fit with ``DataHybrid(ratios: [0.5])`` over the source,
  ``data.cache_processed: true``, a 20-step task of batch 8 (80 samples drawn from the source):
  seconds from process start to the end of the first training step, and the process's peak RSS.

It prints a table per N and how each figure grows with N (ratio to the smallest N).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_scale.py --sizes 10000 100000 665000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = (
    "what is the colour of shape in this image how many objects are there describe picture left right "
    "above below red green blue yellow purple orange square circle triangle a the one two three four "
    "five large small near far man woman dog cat car tree sky street table person holding sitting"
).split()
PNG_COLOURS = [(220, 30, 30), (30, 160, 60), (40, 80, 220), (240, 200, 20)]


# ---- data -------------------------------------------------------------------------------------
def generate(root: Path, n: int) -> Path:
    """root/n/data.json (+ images/), made once and reused (seeded: identical for every version)."""
    from PIL import Image  # noqa: PLC0415

    folder = root / str(n)
    path = folder / "data.json"
    if path.is_file():
        return path
    shutil.rmtree(folder, ignore_errors=True)
    rng, blobs = random.Random(n), []
    for rgb in PNG_COLOURS:  # a few real PNGs, written under N names (file count as in LLaVA-665k)
        tmp = folder / f"c{len(blobs)}.png"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 24), rgb).save(tmp)
        blobs.append(tmp.read_bytes())
        tmp.unlink()
    t0 = time.perf_counter()
    with open(folder / "data.json.tmp", "w", encoding="utf-8") as fh:
        fh.write("[")
        for i in range(n):
            record = {"id": f"{i:07d}"}
            turns = []
            for _ in range(rng.randint(1, 5)):
                question = " ".join(rng.choices(WORDS, k=rng.randint(8, 25))) + "?"
                answer = " ".join(rng.choices(WORDS, k=rng.randint(3, 50))) + "."
                turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            if rng.random() >= 0.05:
                rel = f"images/{i // 1000:04d}/{i:07d}.png"
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (folder / rel).write_bytes(blobs[i % len(blobs)])
                record["image"] = rel
                turns[0]["value"] = "<image>\n" + turns[0]["value"]
            record["conversations"] = turns
            fh.write(("" if i == 0 else ",\n") + json.dumps(record))
        fh.write("]\n")
    os.replace(folder / "data.json.tmp", path)
    size = path.stat().st_size / 2**20
    print(f"generated {path}: {n} records, {size:.0f} MB, in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


# ---- children (one measurement each, in a fresh process) ---------------------------------------
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class WorkerUSS:
    """Polls the USS (private pages) of this process's children, the dataloader workers, and the
    private dirty part of it: USS also counts clean pages of a memory-mapped file that only this
    worker has touched (page cache, shared as soon as another process maps them, dropped by the
    kernel under pressure), private dirty is memory only this worker can ever use."""

    def __init__(self):
        import psutil  # noqa: PLC0415

        self.me, self.peak, self.dirty, self.stop = psutil.Process(), {}, {}, threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)

    def poll(self):
        while not self.stop.wait(0.2):
            for child in self.me.children():
                try:
                    uss = child.memory_full_info().uss / 2**20
                    with open(f"/proc/{child.pid}/smaps_rollup") as fh:
                        dirty = sum(int(line.split()[1]) for line in fh if line.startswith("Private_Dirty"))
                except Exception:  # noqa: BLE001  (a worker exiting between listing and reading)
                    continue
                self.peak[child.pid] = max(self.peak.get(child.pid, 0.0), uss)
                self.dirty[child.pid] = max(self.dirty.get(child.pid, 0.0), dirty / 1024)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def child_load(args) -> dict:
    from mllm_cl.data import LlavaJson  # noqa: PLC0415

    base = peak_rss_mb()  # the imports (torch, transformers, datasets) before any data
    t0 = time.perf_counter()
    table = LlavaJson(args.path).load()
    seconds = time.perf_counter() - t0
    table[len(table) // 2]  # a sample reads back
    return {"seconds": seconds, "rss": peak_rss_mb(), "base": base, "n": len(table)}


def child_loader(args) -> dict:
    from torch.utils.data import DataLoader  # noqa: PLC0415

    from mllm_cl.data import LlavaJson  # noqa: PLC0415
    from mllm_cl.data.collate import Encoder  # noqa: PLC0415
    from mllm_cl.data.stream import TaskSampler, _Encoded  # noqa: PLC0415
    from mllm_cl.families import get_family  # noqa: PLC0415

    table = LlavaJson(args.path).load()
    family = get_family("llava")
    encoder = Encoder(family, family.tiny_processor("tiny"), 2048, "skip")
    loader = DataLoader(
        _Encoded(table, encoder.encode_train), batch_size=8, num_workers=2, collate_fn=encoder.collate,
        sampler=TaskSampler(len(table), args.loader_samples, seed=0),
    )  # fmt: skip
    with WorkerUSS() as uss:
        it = iter(loader)
        next(it)  # worker start-up and the first batch are not the steady rate
        t0 = time.perf_counter()
        count = 8 * sum(1 for _ in it)
        rate = count / (time.perf_counter() - t0)
    return {"rate": rate, "epoch": len(table) / rate, "uss": max(uss.peak.values(), default=0.0),
            "dirty": max(uss.dirty.values(), default=0.0), "rss": peak_rss_mb()}  # fmt: skip


def child_fit(args) -> dict:
    import lightning as L  # noqa: PLC0415

    from mllm_cl.data import LlavaJson, Synthetic, Task, TaskStream  # noqa: PLC0415
    from mllm_cl.module import MLLMModule  # noqa: PLC0415
    from strategies.hybrid import DataHybrid  # noqa: PLC0415

    class FirstStep(L.Callback):
        first = None

        def on_train_batch_end(self, *_):
            self.first = self.first or time.time()

    L.seed_everything(0)
    task = Task("colour", train=Synthetic("colour", n=64, seed=1, image_size=32), steps=20,
                eval=Synthetic("colour", n=2, seed=2, image_size=32))  # fmt: skip
    stream = TaskStream(tasks=[task], batch_size=8, num_workers=2, cache_processed=True,
                        cache_dir=os.environ["MLLM_CL_CACHE"], eval_limit=2)  # fmt: skip
    module = MLLMModule(family="llava", strategies=[DataHybrid([LlavaJson(args.path)], [0.5])], lr=1e-3,
                        max_new_tokens=2)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[step := FirstStep()],
                        default_root_dir=os.environ["MLLM_CL_CACHE"])  # fmt: skip
    trainer.fit(module, datamodule=stream)
    started = float(os.environ["DATA_SCALE_T0"])
    return {"first_step": step.first - started, "total": time.time() - started, "rss": peak_rss_mb()}


def child_build(args) -> dict:
    from mllm_cl.data import LlavaJson  # noqa: PLC0415
    from mllm_cl.data.cache import tokenized  # noqa: PLC0415
    from mllm_cl.data.collate import Encoder  # noqa: PLC0415
    from mllm_cl.families import get_family  # noqa: PLC0415

    table = LlavaJson(args.path).load()
    family = get_family("llava")
    encoder = Encoder(family, family.tiny_processor("tiny"), 2048, "skip")
    before = peak_rss_mb()
    t0 = time.perf_counter()
    cached = tokenized(table, encoder, Path(os.environ["MLLM_CL_CACHE"]) / "processed", num_workers=2)
    seconds = time.perf_counter() - t0
    return {"rate": len(cached) / seconds, "rss": peak_rss_mb(), "growth": peak_rss_mb() - before}


CHILDREN = {"load": child_load, "loader": child_loader, "fit": child_fit, "build": child_build}


def run_child(kind: str, path: Path, cache: Path, args, clear: bool) -> dict:
    if clear:
        shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLLM_CL_CACHE": str(cache), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "DATA_SCALE_T0": repr(time.time())}  # fmt: skip
    cmd = [sys.executable, __file__, "--child", kind, "--path", str(path),
           "--loader-samples", str(args.loader_samples)]  # fmt: skip
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{kind} failed for {path}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- report ----------------------------------------------------------------------------------
ROWS = [
    ("load, first run (s)", "load_cold", "seconds"),
    ("load, later runs (s)", "load_warm", "seconds"),
    ("load, first run: peak RSS (MB)", "load_cold", "rss"),
    ("load, later runs: peak RSS (MB)", "load_warm", "rss"),
    ("  of which imports, before loading (MB)", "load_warm", "base"),
    ("loader: samples/s (2 workers)", "loader", "rate"),
    ("loader: epoch of N samples (s, extrapolated)", "loader", "epoch"),
    ("loader: peak worker USS (MB)", "loader", "uss"),
    ("  of which private dirty (MB)", "loader", "dirty"),
    ("loader: main RSS (MB)", "loader", "rss"),
    ("build the whole source's processed cache: samples/s", "build", "rate"),
    ("  its peak RSS (MB)", "build", "rss"),
    ("  RSS growth while building (MB)", "build", "growth"),
    ("hybrid fit r 0.5, first run: first step (s)", "fit_cold", "first_step"),
    ("hybrid fit, first run: whole fit (s)", "fit_cold", "total"),
    ("hybrid fit, first run: peak RSS (MB)", "fit_cold", "rss"),
    ("hybrid fit, later runs: first step (s)", "fit_warm", "first_step"),
    ("hybrid fit, later runs: peak RSS (MB)", "fit_warm", "rss"),
]


def report(results: dict[int, dict]) -> None:
    sizes = sorted(results)
    head = (
        "| figure | "
        + " | ".join(f"N={n:,}" for n in sizes)
        + " | growth (x per N x"
        + (f"{sizes[-1] / sizes[0]:.1f})" if len(sizes) > 1 else ")")
    )
    print("\n" + head + " |\n|---|" + "---|" * (len(sizes) + 1))
    for label, step, key in ROWS:
        values = [results[n].get(step, {}).get(key) for n in sizes]
        if all(v is None for v in values):
            continue
        cells = ["-" if v is None else f"{v:,.1f}" for v in values]
        growth = values[-1] / values[0] if None not in (values[0], values[-1]) and values[0] else None
        print(f"| {label} | " + " | ".join(cells) + f" | {'-' if growth is None else f'{growth:.1f}'} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 665_000])
    parser.add_argument("--root", default="/tmp/mllm_cl_data_scale", help="generated data and caches")
    parser.add_argument(
        "--steps", nargs="+", default=["load", "loader", "fit"], choices=["load", "loader", "build", "fit"],
        help="build (not by default): the processed-data cache of the whole source",
    )  # fmt: skip
    parser.add_argument("--loader-samples", type=int, default=1024)
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(REPO))
        print(json.dumps(CHILDREN[args.child](args)))
        return
    root = Path(args.root)
    results = {}
    for n in args.sizes:
        path, cache, res = generate(root, n), root / f"cache-{n}", {}
        if "load" in args.steps:
            res["load_cold"] = run_child("load", path, cache, args, clear=True)
            res["load_warm"] = run_child("load", path, cache, args, clear=False)
        if "loader" in args.steps:
            res["loader"] = run_child("loader", path, cache, args, clear=False)
        if "build" in args.steps:
            run_child("load", path, cache, args, clear=True)  # the conversion is not part of it
            res["build"] = run_child("build", path, cache, args, clear=False)
        if "fit" in args.steps:
            res["fit_cold"] = run_child("fit", path, cache, args, clear=True)
            res["fit_warm"] = run_child("fit", path, cache, args, clear=False)
        results[n] = res
        print(f"N={n:,}: {json.dumps(res)}", flush=True)
    report(results)
    print("reproduce: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_scale.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
