#!/usr/bin/env bash
# A whole GPU session in one run, under 10 minutes on a fresh H100/H200 machine:
#
#   here, once:   bash scripts/gpu_session.sh wheels     # pydantic & co. for the GPU's Python
#   on the GPU:   bash scripts/gpu_session.sh            # device tool: carry [".whl"], timeout 600
#   dry run:      bash scripts/gpu_session.sh --dry-run  # CPU, Triton interpreter, tiny sizes (CI)
#
# Steps, each under its own time limit so that the whole run ends in time:
#   1. the generated kernels' tests on the device: fp32/fp16/bf16 against the float64 reference,
#      forward and backward, every built-in scaled down, random patterns;
#   2. `spattn check` for the device's own target (every launch compiled, spills, tensor cores);
#   3. the benchmark harness: spattn against dense SDPA (flash), FlexAttention and
#      gather + SDPA + scatter, forward and forward + backward, CSV and plot; its warm-up calls
#      tune every launch (spattn/runtime/tuning.py), and the tuned choices are kept in
#      $OUT/spattn-cache/tuning/ (steps 1 and 2 use the committed table's defaults);
# then a short table of all three, printed last. Everything lands in $OUT (the device tool
# brings it back), else benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-gpu}
out=${OUT:-benchmarks/results}
mkdir -p "$out"

if [ "$mode" = wheels ]; then
    grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
    for spec in pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
                typing-inspection==0.4.2; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d .whl "$spec" || exit 1
    done
    ls .whl
    exit 0
fi

export PYTHONUNBUFFERED=1
export SPATTN_CACHE_DIR="$out/spattn-cache"  # the tuning choices come back with the results
if [ "$mode" = --dry-run ]; then
    export TRITON_INTERPRET=1
    echo "dry run on $(uname -m), $(nproc) CPU threads: the Triton interpreter, tiny sizes"
    tests=(tests/test_triton_kernels.py -k "odd_sizes and n1")
    target=sm_90
    check=(--dtype fp16 --head-dim 64)
    bench=(--cpu-check --seq-lens 256 --patterns longnet-lm --methods spattn sdpa --repeats 1)
    limits=(300 300 300)
else
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site:$PWD
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    tests=(tests/test_triton_kernels.py tests/test_decode.py
           tests/test_queries_sinks_layout.py::test_generated_kernels_random_patterns
           tests/test_strides.py::test_generated_kernels_any_strides)
    target=sm_$(python3 -c "import torch; a, b = torch.cuda.get_device_capability(); print(a * 10 + b)")
    check=(--dtype fp16 bf16 fp32 --head-dim 64 128)
    bench=(--patterns longnet-lm sliding-window sink-window --head-dims 64 128 --seq-lens 8192 \
           32768 131072 --prefix gpu_session)
    limits=(180 120 270)
fi

echo "== 1/3 tests"
SPATTN_TUNE=0 timeout "${limits[0]}" python3 -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 \
    | tee "$out/gpu_session_tests.log" | tail -n 3
echo "== 2/3 spattn check longnet-lm --target $target"
timeout "${limits[1]}" python3 -m spattn.cli.main check longnet-lm --target "$target" \
    "${check[@]}" > "$out/gpu_session_check.txt" 2>&1
tail -n 1 "$out/gpu_session_check.txt"
echo "== 3/3 benchmark harness"
timeout "${limits[2]}" python3 benchmarks/bench_gpu.py --results "$out" "${bench[@]}" \
    > "$out/gpu_session_bench.log" 2>&1
tail -n 2 "$out/gpu_session_bench.log"
echo "== summary"
python3 scripts/gpu_summary.py "$out"
