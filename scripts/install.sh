#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtualenv in .venv with torch first, then mllm_cl.
# torch goes first and pinned so pip never replaces it with a multi-GB CUDA build; override with
# TORCH_SPEC (e.g. TORCH_SPEC="torch==2.6.0" on a GPU machine with its own index).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
# torchvision must not be present with a CPU torch: its registry wheel is a CUDA build and breaks
# `import transformers` model classes. Nothing we depend on pulls it; fail loudly if something did.
if .venv/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
  .venv/bin/python -c "import torchvision" 2>/dev/null || { echo "torchvision is installed but broken; pip uninstall torchvision"; exit 1; }
fi
echo "mllm_cl installed in .venv"
