#!/usr/bin/env bash
# The GPU checks of issue 14 as one script, about 8 minutes on one H100/H200:
#   - pytest -m gpu (FSDP1 + bf16, LwF under bf16 with the FSDP1 precision context);
#   - SA Proj training throughput on a LLaVA-1.5-7B-shaped model (random weights on the meta device,
#     no download), two ways: the plain loop (benchmarks/gpu_throughput.py) and the real fit path
#     (benchmarks/gpu_fit_throughput.py: MLLMModule + Trainer, bf16-mixed, checkpointing off/on):
#     tokens/s, MFU, fit/plain, and a torch.profiler view of the fit step (top kernels);
#   - peak GPU memory of the fit step next to `python -m mllm_cl plan` for the same setup;
#   - batched (32) vs batch-1 greedy evaluation of 64 mixed-length prompts on the same 7B shape;
#   - the same throughput for Qwen2.5-VL-7B, and LLaVA-OneVision-7B if that family exists.
# Writes $OUT_DIR/gpu_check.json, gpu_check.md and gpu_check.log (OUT_DIR defaults to $OUT, else
# ./gpu_check_out) and prints the markdown last.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run    # CPU: each script's --help, every config parsed by the
#                                             # real MllmCLI, each check's smoke run, the summary
#   bash benchmarks/gpu_check.sh --list       # the planned checks, their commands and time budget
#
# Installing on the device machine. This workplace's GPU machine (nvidia-h200, see
# /work/.library/device/KINDS.md) starts bare and reaches no network: nothing installs from an index
# there, so neither `bash scripts/install.sh` nor a TORCH_SPEC naming an index works. Its python3
# (/opt/torch/.venv) has torch 2.11 built for CUDA 13.0, lightning 2.6.6, transformers 5.17, peft,
# torchmetrics, tensorboard, pytest, pyarrow and pandas, and lacks jsonargparse and datasets. So:
#   1. where pip reaches the registry, once: `bash benchmarks/gpu_wheels.sh` puts those (and
#      transformers at the version the CPU tests use) as wheels into .whl/ (git-ignored, ~15 MB);
#   2. on the device, carry .whl: this script installs .whl/*.whl offline (--no-index --no-deps) into
#      /tmp/gpu_check_site and puts that first on PYTHONPATH. With the device tool:
#        run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560)
#      (~9 of the lease's 15 minutes with the machine's start; results come back from $OUT).
# TORCH_SPEC: only where the machine's torch is unusable and pip can reach what it names: a wheel file
# (TORCH_SPEC=.whl/torch-...-cp312-...whl; a CUDA torch wheel is ~1 GB, over the device tool's 64 MiB
# carry limit, so not on this workplace's machine) or, on a machine with network, a spec with its
# index (TORCH_SPEC="torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130"). It goes into
# the same folder, before the checks start (its minutes count against the 8).
# PYTHON: the interpreter (default .venv/bin/python when present, else python3).
# GPU_CHECK_BUDGET_S: the checks' time budget in seconds (default 480); steps that no longer fit are
# skipped, least important last in the list first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mode=${1:-}
if [ "$mode" != "--dry-run" ] && [ "$mode" != "--list" ]; then
  SITE=/tmp/gpu_check_site
  if [ -n "${TORCH_SPEC:-}" ]; then
    # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options (--index-url ...)
    "$PY" -m pip install -q --no-cache-dir --upgrade --target "$SITE" $TORCH_SPEC || { echo "TORCH_SPEC install failed"; exit 1; }
  fi
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || { echo "installing .whl/*.whl failed"; exit 1; }
  fi
  if [ -d "$SITE" ]; then export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"; fi
fi
export OUT_DIR=${OUT_DIR:-${OUT:-gpu_check_out}}
exec "$PY" benchmarks/gpu_check.py "$@"
