"""Wall time of the whole CPU demo (`python -m mllm_cl.demo`); target <= 5 min on 2 cores.

The demo runs in a fresh working directory (its runs/demo is written there, not over yours).

    .venv/bin/python benchmarks/demo_time.py [--workdir DIR] [extra demo args, e.g. --strategies]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where runs/demo goes (default: a new temp dir)")
    args, demo_args = parser.parse_known_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="mllm_cl_demo_")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mllm_cl.demo", *demo_args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env)
    wall = time.perf_counter() - t0
    print(f"demo wall time: {wall:.1f} s ({wall / 60:.2f} min; target <= 5 min), exit code {proc.returncode}")
    print(f"runs in {workdir}/runs/demo")
    print("reproduce: .venv/bin/python benchmarks/demo_time.py " + " ".join(sys.argv[1:]))
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
