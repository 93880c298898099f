#!/usr/bin/env bash
# The main job: install, then inspect and run the built-in longnet-lm pattern on random data here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
set -x
spattn list
spattn inspect longnet-lm --seq-len 16384 --heads 4
spattn run longnet-lm --seq-len 16384 --heads 4 --head-dim 64 --backward
