"""The CPU demo: watch forgetting happen with one recipe and much less with another.

    python -m mllm_cl.demo

1. `configs/demo_base.yaml`: a tiny LLaVA-architecture model learns colour + shape (the base skills)
   and is exported to runs/demo/base_model.
2. `configs/demo_full.yaml` and `configs/demo_saproj.yaml`, side by side (one CPU thread each):
   the same two new skills from that base, training everything vs only the LLM's q/k/v/o.
3. A table of learning and held-out change per recipe (`python -m mllm_cl report`), the accuracy
   matrices, and plots under runs/demo/report.
Everything is offline and seeded; on 2 CPU cores it takes a few minutes.

With ``--strategies`` it also runs MLP Gate&Up, Full + LwF / WiSE-FT (α 0.5, and α chosen after each
task on validation sets that the matrix never reports) / data-hybrid / replay. The WiSE-FT variant
is `configs/demo_wiseft.yaml` plus the override `WISEFT_VALIDATION` below, written to
runs/demo/wiseft_val.yaml and passed as a second ``--config``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import yaml

from mllm_cl.report import compare, plot
from mllm_cl.results import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _synthetic(skill: str, seed: int) -> dict:
    args = {"skill": skill, "n": 50, "seed": seed, "object_size": [0.25, 0.5]}
    return {"class_path": "Synthetic", "init_args": args}


# WiSE-FT with α chosen after every task on validation sets (new seeds of every skill of the demo:
# the two new tasks and the two base skills), never on the sets the accuracy matrix reports.
WISEFT_VALIDATION = {
    "trainer": {
        "callbacks": [],
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs/demo", "name": "full+wiseft(val)"},
        },
    },
    "model": {
        "strategies": [
            {
                "class_path": "WiSEFT",
                "init_args": {
                    "alphas": [0.0, 0.25, 0.5, 0.75, 1.0],
                    "validation": [
                        {"name": f"{skill}_val", "data": _synthetic(skill, seed)}
                        for skill, seed in (
                            ("colour_ood_text", 41),
                            ("classify", 42),
                            ("colour", 43),
                            ("shape", 44),
                        )
                    ],
                },
            }
        ]
    },
}
_OVERRIDES = {"wiseft_val": ("demo_wiseft.yaml", WISEFT_VALIDATION)}


def _fit(name: str, version: str, threads: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    config, override = _OVERRIDES.get(name, (f"demo_{name}.yaml", None))
    cmd = [sys.executable, "-m", "mllm_cl", "fit", "--config", os.path.join(ROOT, "configs", config)]
    if override is not None:
        path = os.path.join("runs", "demo", f"{name}.yaml")
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(override, fh, sort_keys=False)
        cmd += ["--config", path]
    cmd += [f"--trainer.logger.init_args.version={version}"]
    log = open(os.path.join("runs", "demo", f"{name}.{version}.log"), "w")
    print("$ " + " ".join(cmd[1:]), flush=True)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.wait() != 0:
            sys.exit(f"error: {' '.join(proc.args[1:])} failed; see its log in runs/demo/*.log")


# (config name, run name = the display name in TensorBoard and the report); the first two always
# run, the rest with --strategies.
_DEMOS = [
    ("full", "full"),
    ("saproj", "saproj"),
    ("gateup", "mlpgateup"),
    ("lwf", "full+lwf"),
    ("wiseft", "full+wiseft0.5"),
    ("wiseft_val", "full+wiseft(val)"),
    ("hybrid", "full+datahybrid"),
    ("replay", "full+replay"),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mllm_cl.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reuse-base", action="store_true", help="skip step 1 if runs/demo/base_model exists"
    )
    parser.add_argument(
        "--strategies",
        action="store_true",
        help="also run MLP Gate&Up, LwF, WiSE-FT (α 0.5 and α chosen on validation sets), data-hybrid, replay",
    )
    args = parser.parse_args(argv)
    os.makedirs(os.path.join("runs", "demo"), exist_ok=True)
    version, start = time.strftime("%Y%m%d-%H%M%S"), time.time()
    if not (args.reuse_base and os.path.isdir(os.path.join("runs", "demo", "base_model"))):
        _wait([_fit("base", version, threads=os.cpu_count() or 1)])
    chosen = [*_DEMOS[:2], *(_DEMOS[2:] if args.strategies else [])]
    for pair in range(0, len(chosen), 2):  # two at a time, one thread each
        _wait([_fit(name, version, threads=1) for name, _ in chosen[pair : pair + 2]])
    runs = [os.path.join("runs", "demo", run, version) for _, run in chosen]
    text = compare(runs)
    print("\n" + text)
    out = os.path.join("runs", "demo", "report")
    paths = plot(runs, out)
    atomic_write(os.path.join(out, "report.md"), text)
    print("report: " + ", ".join([os.path.join(out, "report.md"), *paths]))
    print(
        f"demo wall time: {time.time() - start:.0f} s; TensorBoard: tensorboard --logdir runs/demo, "
        "then http://localhost:6006/#scalars&_smoothingWeight=0 (no smoothing of the 3-point series)"
    )


if __name__ == "__main__":
    main()
