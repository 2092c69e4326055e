#!/usr/bin/env bash
# Installs torch into the active environment, choosing the build for this machine:
#   - TORCH_SPEC set: exactly that (e.g. TORCH_SPEC="torch==2.5.1")
#   - an NVIDIA GPU present: the default PyPI build (CUDA)
#   - an Ascend NPU present: the default build; torch_npu comes with `pip install -e ".[npu]"`
#   - otherwise the CPU build: the version the lock file $LOCK pins (default .ci/constraints.txt), else
#     torch 2.13.0+cpu; a local CPU wheel if pip finds one, else PyTorch's CPU index.
set -euo pipefail
PIP=${PIP:-python -m pip}
LOCK=${LOCK-.ci/constraints.txt}
if [ -n "${TORCH_SPEC:-}" ]; then
  $PIP install --quiet "$TORCH_SPEC"; exit 0
fi
if $PIP show torch >/dev/null 2>&1; then
  echo "torch already installed: $($PIP show torch | sed -n 's/^Version: //p')"; exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 || command -v npu-smi >/dev/null 2>&1; then
  $PIP install --quiet "torch>=2.3"; exit 0
fi
spec="torch==2.13.0+cpu"
if [ -n "$LOCK" ] && [ -f "$LOCK" ] && grep -q '^torch==' "$LOCK"; then spec=$(grep -m1 '^torch==' "$LOCK"); fi
echo "no accelerator found: installing the CPU build of torch ($spec)"
$PIP install --quiet --only-binary=:all: "$spec" 2>/dev/null \
  || $PIP install --quiet "$spec" --index-url https://download.pytorch.org/whl/cpu
