"""The CPU demo: watch forgetting happen with one recipe and much less with another.

    python -m mllm_cl.demo

1. `configs/demo_base.yaml`: a tiny LLaVA-architecture model learns colour + shape (the base skills)
   and is exported to runs/demo/base_model.
2. `configs/demo_full.yaml` and `configs/demo_saproj.yaml`, side by side (one CPU thread each):
   the same two new skills from that base, training everything vs only the LLM's q/k/v/o.
3. A table of learning and held-out change per recipe (`python -m mllm_cl report`), the accuracy
   matrices, and plots under runs/demo/report.
Everything is offline and seeded; on 2 CPU cores it takes a few minutes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from mllm_cl.report import compare, plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fit(config: str, version: str, threads: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "mllm_cl", "fit", "--config", os.path.join(ROOT, "configs", config)]
    cmd += [f"--trainer.logger.init_args.version={version}"]
    log = open(os.path.join("runs", "demo", f"{config}.{version}.log"), "w")
    print("$ " + " ".join(cmd[1:]), flush=True)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.wait() != 0:
            sys.exit(f"error: {' '.join(proc.args[1:])} failed; see its log in runs/demo/*.log")


# (config name, table label); the first two always run, the rest with --strategies.
_DEMOS = [
    ("full", "Full"),
    ("saproj", "SA Proj"),
    ("gateup", "MLP Gate&Up"),
    ("lwf", "Full + LwF"),
    ("wiseft", "Full + WiSE-FT"),
    ("hybrid", "Full + hybrid 25%"),
    ("replay", "Full + replay 25%"),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mllm_cl.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reuse-base", action="store_true", help="skip step 1 if runs/demo/base_model exists"
    )
    parser.add_argument(
        "--strategies", action="store_true", help="also run MLP Gate&Up, LwF, WiSE-FT, data-hybrid and replay"
    )
    args = parser.parse_args(argv)
    os.makedirs(os.path.join("runs", "demo"), exist_ok=True)
    version, start = time.strftime("%Y%m%d-%H%M%S"), time.time()
    if not (args.reuse_base and os.path.isdir(os.path.join("runs", "demo", "base_model"))):
        _wait([_fit("demo_base.yaml", version, threads=os.cpu_count() or 1)])
    chosen = [*_DEMOS[:2], *(_DEMOS[2:] if args.strategies else [])]
    for pair in range(0, len(chosen), 2):  # two at a time, one thread each
        _wait([_fit(f"demo_{name}.yaml", version, threads=1) for name, _ in chosen[pair : pair + 2]])
    runs = [os.path.join("runs", "demo", name, version) for name, _ in chosen]
    labels = [label for _, label in chosen]
    print("\n" + compare(runs, names=labels))
    paths = plot(runs, os.path.join("runs", "demo", "report"), names=labels)
    print("plots: " + ", ".join(paths))
    print(f"demo wall time: {time.time() - start:.0f} s; TensorBoard: tensorboard --logdir runs/demo")


if __name__ == "__main__":
    main()
