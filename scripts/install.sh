#!/usr/bin/env bash
# Install spattn and its test tools into the current Python. torch goes first, pinned, so that
# nothing resolves `torch` to the newest release (on the project's CPU machines 2.13.0 is a CPU
# build on disk; elsewhere pip fetches it). The `hf` extra (transformers) is installed too, so the
# Hugging Face integration is tested.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet --root-user-action=ignore "torch==2.13.0"
fi
"$PY" -m pip install --quiet --root-user-action=ignore -e ".[test,hf]"
