#!/usr/bin/env bash
# Download, where pip reaches the registry, the wheels the GPU machine lacks into .whl/ (git-ignored),
# for `bash benchmarks/gpu_check.sh` to install offline there (see its header):
#   jsonargparse (+ docstring-parser, typeshed-client for [signatures]), datasets (+ dill,
#   multiprocess), and transformers at the version the CPU tests run (the machine has 5.17).
# Versions are read from this checkout's environment, so the GPU runs what the CPU tests ran; the
# target is the machine's CPython 3.12 on x86-64 Linux.
#   bash benchmarks/gpu_wheels.sh        # then: device run with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
grep -qx '/.whl/' .gitignore 2>/dev/null || grep -qx '/.whl/' .git/info/exclude 2>/dev/null \
  || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for name in jsonargparse docstring-parser typeshed-client datasets dill multiprocess transformers; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  rm -f .whl/"$(echo "$name" | tr - _)"-*.whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name==$version"
done
ls -la .whl
du -sh .whl
