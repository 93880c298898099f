#!/usr/bin/env bash
# The GPU image's triton (3.6.0; its interpreter needs numpy < 2.4), in a virtual environment of
# its own, so that the version GPUs run is never broken silently:
#   1. `spattn check` on every built-in for sm_90: every kernel compiles, none spills, all on
#      tensor cores (benchmarks/check_builtins.py --strict);
#   2. the generated kernels under the interpreter against the float64 reference;
#   3. the GPU session rehearsed (scripts/gpu_session.sh --rehearse): every step at tiny sizes on
#      the interpreter, its time plan checked against the deadlines (exit 1 if it does not fit).
# CI (.ci/run) runs it after the main suite. TRITON36_VENV names the environment's folder.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TRITON36_VENV:-.venv-triton36}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip install --quiet --root-user-action=ignore)
"$py" -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
"${pip[@]}" "triton==3.6.0" "numpy<2.4"
"${pip[@]}" -e ".[test]"
"$py" -c "import triton; assert triton.__version__ == '3.6.0', triton.__version__"
results=$(mktemp -d)
trap 'rm -rf "$results"' EXIT
"$py" benchmarks/check_builtins.py --targets sm_90 --strict --results "$results"
status=0
"$py" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_triton_interpret.py \
    tests/test_check.py || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests under triton 3.6: that is a failure here" >&2
    exit 1
fi
((status == 0)) || exit "$status"
REHEARSE_PYTHON="$py" OUT="$results/gpu-session" bash scripts/gpu_session.sh --rehearse
