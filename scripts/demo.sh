#!/usr/bin/env bash
# The main job: install; inspect, compile and run the built-in longnet-lm pattern on random data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
# the emitted module runs on a GPU when there is one, else under the Triton interpreter (small N)
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export TRITON_INTERPRET=1
fi
set -x
spattn list
spattn inspect longnet-lm --seq-len 16384 --heads 4
spattn run longnet-lm --seq-len 16384 --heads 4 --head-dim 64 --backward
spattn compile longnet-lm -o out/ --head-dim 64
"$PY" examples/run_compiled.py out/longnet_lm.py
