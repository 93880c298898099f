#!/usr/bin/env bash
# The test command: install, lint, run the whole suite on CPU (pytest's "no tests" exit 5 fails).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
"$PY" -m ruff check spattn tests benchmarks examples scripts
status=0
"$PY" -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$status"
