#!/usr/bin/env bash
# A GPU session's work, one stage per device-tool call (each call may run 10 minutes at most).
#
#   here, once:   bash scripts/gpu_session.sh wheels      # pydantic & co. for the GPU's Python 3.12
#   on the GPU:   bash scripts/gpu_session.sh STAGE       # with carry: [".whl"]
#
# STAGE: tests (the kernel, autograd and torch.compile tests on CUDA: fp32, fp16, bf16),
# longnet64, longnet128, windows (the benchmark sweep in three parts), scale (longest N).
# Results land in $OUT (the device tool brings them back) or benchmarks/results/.
set -uo pipefail
stage=${1:?usage: gpu_session.sh wheels|tests|longnet64|longnet128|windows|scale}
out=${OUT:-benchmarks/results}

if [ "$stage" = wheels ]; then
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

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
bench() { python3 benchmarks/bench_gpu.py --results "$out" "$@" 2>&1 | tee -a "$out/bench.log"; }
case "$stage" in
    tests) python3 -m pytest -q -x tests/test_triton_kernels.py tests/test_triton_interpret.py \
               tests/test_compile_graph.py 2>&1 | tee "$out/gpu_tests.log" ;;
    longnet64) bench --prefix gpu_longnet64 --patterns longnet-lm --head-dims 64 ;;
    longnet128) bench --prefix gpu_longnet128 --patterns longnet-lm --head-dims 128 ;;
    windows) bench --prefix gpu_windows --patterns sliding-window sink-window --head-dims 64 \
                 --methods spattn sdpa flex ;;
    scale) bench --prefix gpu_scale --patterns longnet-lm --head-dims 64 --seq-lens 32768 \
               --methods spattn --passes fwd --scale ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
