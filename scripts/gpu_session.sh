#!/usr/bin/env bash
# A whole GPU session in one command, on a fresh H100/H200 machine through the device tool (one
# command of at most 10 minutes; at most 8 files come back from $OUT):
#
#   here, once:   bash scripts/gpu_session.sh wheels      # pydantic & co. for the GPU's Python
#   on the GPU:   bash scripts/gpu_session.sh             # device tool: carry [".whl"], timeout_s 600
#   rehearsal:    bash scripts/gpu_session.sh --rehearse  # CPU (CI; --dry-run is the same): the
#                 same steps at tiny sizes on the Triton interpreter under ${REHEARSE_PYTHON:-python3},
#                 and the time plan checked (scripts/gpu_plan.py): exit 1 if it does not fit
#
# The whole run takes at most BUDGET (420 s) of wall time. Each step has its own deadline
# (`timeout`), cut to what is left of the budget, and the deadlines add up to the budget:
#   setup     25 s  the carried wheels into /tmp; torch, CUDA and the GPU's target
#   tests    125 s  the generated kernels' tests on the GPU over pytest-xdist's workers (fp32,
#                   fp16, bf16 against float64, forward and backward, every built-in scaled down,
#                   odd sizes, decoding; GPU_SESSION_TESTS replaces the selection). A failure is
#                   fatal: the failures and the summary are printed, no timing runs, exit 1
#   headline  75 s  longnet-lm, bf16, D=128 at 8K, 32K and 128K tokens, fwd and fwd+bwd:
#                   spattn against SDPA's flash kernel and gather + SDPA + scatter
#   flex      55 s  FlexAttention on longnet-lm's 32K cell
#   others   125 s  the other built-ins at 32K (GPU_SESSION_PATTERNS: sliding-window sink-window)
#   summary   15 s  the summary (summary.txt), the tuning choices in one file, the plot
# Beside the three benchmark steps `spattn check` compiles the benchmarked patterns for the GPU's
# target (bf16, D=128; its own deadline, CHECK_LIMIT) and scripts/gpu_plan.py notes the plan.
# The benchmark checks each method against a float64 reference before timing it; a method
# beyond its dtype's tolerance is marked wrong in bench.csv, not timed, and the run exits 1.
# Every row of bench.csv is appended as it is measured: a deadline loses nothing measured.
#
# $OUT (else benchmarks/results/gpu-session) gets these files and no others (caches live in a
# temporary folder): session.log (everything), tests.log, check.txt, bench.csv, bench.png,
# tuning.json, summary.txt. Exit status: 0; 1 when a test failed, a method was wrong (or, when
# rehearsing, the plan does not fit or $OUT holds other files); 2 when a step crashed.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-gpu}
case "$mode" in
    gpu | --rehearse | wheels) ;;
    --dry-run) mode=--rehearse ;;
    *) echo "usage: bash scripts/gpu_session.sh [wheels | --rehearse]" >&2; exit 2 ;;
esac

if [ "$mode" = wheels ]; then  # the packages the GPU image lacks, for its Python (3.12)
    grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
    for spec in pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
                typing-inspection==0.4.2 typing-extensions==4.15.0; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d .whl "$spec" || exit 1
    done
    ls .whl
    exit 0
fi

out=${OUT:-benchmarks/results/gpu-session}
FILES=(session.log tests.log check.txt bench.csv bench.png tuning.json summary.txt)
MAX_FILES=8  # what the device tool brings back
if [ -z "${GPU_SESSION_TEED:-}" ]; then  # everything into session.log: run again under tee
    mkdir -p "$out" || exit 1
    for name in "${FILES[@]}"; do rm -f "$out/$name"; done  # this script's own, from before
    GPU_SESSION_TEED=1 OUT="$out" bash "$0" "$mode" 2>&1 | tee "$out/session.log"
    exit "${PIPESTATUS[0]}"
fi

BUDGET=420
ORDER=(setup tests headline flex others summary)
declare -A LIMIT=([setup]=25 [tests]=125 [headline]=75 [flex]=55 [others]=125 [summary]=15)
declare -A ALLOWANCE=([headline]=40 [flex]=15 [others]=30)  # gpu_plan.py: all but compiling
CHECK_LIMIT=150
GRACE=10  # after a deadline's signal, seconds until SIGKILL
read -ra others <<< "${GPU_SESSION_PATTERNS:-sliding-window sink-window}"
started=$SECONDS
steps=()
cache=$(mktemp -d /tmp/gpu-session.XXXXXX)  # every cache, outside $OUT
trap 'rm -rf "$cache"' EXIT
export PYTHONUNBUFFERED=1 SPATTN_CACHE_DIR="$cache/spattn" TRITON_CACHE_DIR="$cache/triton" \
    TORCHINDUCTOR_CACHE_DIR="$cache/inductor" MPLCONFIGDIR="$cache/matplotlib" \
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
plan=()
for step in "${ORDER[@]}"; do plan+=(--deadline "$step=${LIMIT[$step]}"); done
for step in "${!ALLOWANCE[@]}"; do plan+=(--allowance "$step=${ALLOWANCE[$step]}"); done
plan+=(--budget "$BUDGET" --step headline=longnet-lm --step "others=$(IFS=,; echo "${others[*]}")"
       --flex-step flex --dtype bf16 --head-dim 128)

# run_step NAME LIMIT SIGNAL LOG COMMAND...: COMMAND under its deadline (cut to what is left of
# the budget on the GPU), its output also into LOG unless LOG is '-'; sets rc, notes the step
run_step() {
    local name=$1 limit=$2 signal=$3 log=$4 began=$SECONDS rest outcome
    shift 4
    if [ "$mode" = gpu ]; then
        rest=$((BUDGET - LIMIT[summary] - (SECONDS - started) - GRACE))
        ((limit > rest)) && limit=$rest
    fi
    if ((limit < 5)); then
        echo "== $name: skipped, no time left"
        steps+=("$name=skipped")
        rc=124
        return
    fi
    echo "== $name (deadline ${limit} s, at $((SECONDS - started)) s)"
    if [ "$log" = - ]; then
        timeout -s "$signal" -k "$GRACE" "$limit" "$@"
        rc=$?
    else
        timeout -s "$signal" -k "$GRACE" "$limit" "$@" 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
    fi
    case $rc in
        0) outcome=ok ;;
        124 | 137) outcome="timed out" ;;
        *) outcome="exit $rc" ;;
    esac
    steps+=("$name=$outcome:$((SECONDS - began))s")
}

finish() {  # the summary, the files check, the exit status
    local status=$1 name extra=() count
    [ -n "${check_pid:-}" ] && wait "$check_pid"
    echo "== summary (at $((SECONDS - started)) s)"
    timeout -k 5 "${LIMIT[summary]}" "$py" scripts/gpu_summary.py "$out" --plot "$out/bench.png" \
        --tuning-dir "$SPATTN_CACHE_DIR/tuning" "${steps[@]/#/--step=}" | tee "$out/summary.txt"
    for path in "$out"/* "$out"/.[!.]*; do
        [ -e "$path" ] || continue
        name=${path##*/}
        [[ " ${FILES[*]} " == *" $name "* ]] || extra+=("$name")
    done
    if ((${#extra[@]})); then  # keep $OUT to its files: the others go to the temporary folder
        echo "files in $OUT that are not the session's, moved out: ${extra[*]}" >&2
        mkdir -p "$cache/moved" && for name in "${extra[@]}"; do mv "$out/$name" "$cache/moved/"; done
        [ "$mode" = --rehearse ] && status=1
    fi
    count=$(find "$out" -type f | wc -l)
    echo "files in $out: $count of at most $MAX_FILES (the list: ${FILES[*]})"
    if ((count > MAX_FILES || ${#FILES[@]} > MAX_FILES)); then
        echo "more than $MAX_FILES files would come back" >&2
        status=1
    fi
    echo "== done in $((SECONDS - started)) s, exit $status"
    exit "$status"
}

if [ "$mode" = --rehearse ]; then
    py=${REHEARSE_PYTHON:-python3}
    export TRITON_INTERPRET=1
    echo "rehearsal on $(uname -m), $(nproc) CPU threads: $("$py" -c 'import sys, torch, triton
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}")')"
    echo "  the Triton interpreter at tiny sizes; the time plan checked; deadlines not applied"
    target=sm_90
    default_tests="tests/test_triton_kernels.py::test_odd_sizes
                   tests/test_triton_kernels.py::test_half_precision
                   tests/test_decode.py::test_generated_decode_kernel tests/test_gpu_kernels.py"
    workers=1
    bench_common=(--cpu-check --repeats 1)
    headline_lens=(256) flex_lens=(256) other_lens=(256) flex_passes=(fwd)
    for step in "${!LIMIT[@]}"; do LIMIT[$step]=600; done  # (a shared CPU: no deadline is real)
else
    py=python3
    echo "== setup"
    if [ -d .whl ]; then
        timeout 10 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$cache/site" .whl/*.whl || echo "installing .whl/ failed" >&2
        export PYTHONPATH="$cache/site:$PYTHONPATH"
    fi
    timeout 5 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    target=$(timeout 10 "$py" -c 'import sys, pydantic, torch, triton
assert torch.cuda.is_available(), "no CUDA device"
a, b = torch.cuda.get_device_capability()
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__},"
      f" pydantic {pydantic.__version__}, {torch.cuda.get_device_name()}", file=sys.stderr)
print(f"sm_{a}{b}")')
    if [ -z "$target" ]; then
        echo "setup failed: no CUDA device, or a package missing (bash scripts/gpu_session.sh" \
             "wheels here, then carry .whl)" >&2
        steps+=("setup=failed")
        finish 2
    fi
    steps+=("setup=ok:$((SECONDS - started))s")
    # left out: test_random_patterns (30 hypothesis examples in one worker, each compiling its
    # own kernels: the long pole; random patterns still run in the sinks and strides tests) and
    # the random decoding test (float64 on CPU: nothing of the GPU's)
    default_tests="tests/test_gpu_kernels.py tests/test_triton_kernels.py tests/test_decode.py
                   tests/test_gpu_dispatch.py
                   tests/test_queries_sinks_layout.py::test_generated_kernels_random_patterns
                   tests/test_strides.py::test_generated_kernels_any_strides
                   --deselect tests/test_triton_kernels.py::test_random_patterns
                   --deselect tests/test_decode.py::test_random_patterns_decode_like_the_full_forward"
    workers=$(nproc)
    ((workers > 16)) && workers=16
    bench_common=(--dtype bfloat16 --head-dims 128 --heads 16 --tokens 262144)
    headline_lens=(8192 32768 131072) flex_lens=(32768) other_lens=(32768) flex_passes=(fwd fwd+bwd)
fi

# GPU_SESSION_TESTS: pytest's arguments, split on white space (no quoting)
read -r -d '' -a tests <<< "${GPU_SESSION_TESTS:-$default_tests}" || true
xdist=()
if ((workers > 1)) && "$py" -c "import xdist" 2>/dev/null; then
    xdist=(-n "$workers")
elif ((workers > 1)); then
    echo "(no pytest-xdist: the tests run in one process)"
fi
SPATTN_TUNE=0 run_step tests "${LIMIT[tests]}" INT "$out/tests.log" \
    "$py" -m pytest -q -p no:cacheprovider -rfE "${xdist[@]}" "${tests[@]}"
# failures: pytest's FAILED/ERROR lines, or an F or E in its progress lines (a run cut short)
failures=$(grep -E '^(FAILED|ERROR) |^[.sxXFE]*[FE][.sxXFE]*( +\[ *[0-9]+%\])?$' "$out/tests.log")
if [ "$rc" -ne 0 ] && { [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || [ -n "$failures" ]; }; then
    echo "== tests FAILED (exit $rc): no timing runs, wrong kernels give meaningless timings"
    grep -E '^(FAILED|ERROR) ' "$out/tests.log"
    steps+=("timings=skipped")
    finish 1
fi
((rc == 0)) || echo "(the tests ran out of time with no failure seen: the benchmark checks each method itself)"

status=0
if [ "$mode" = --rehearse ]; then
    echo "== plan: spattn check for $target, the benchmark's kernels, against the deadlines"
    "$py" scripts/gpu_plan.py --check-file "$out/check.txt" --target "$target" "${plan[@]}" \
        || status=1
else  # the same check on the GPU's machine, beside the benchmark, for the record
    timeout -k 5 "$CHECK_LIMIT" "$py" scripts/gpu_plan.py --check-file "$out/check.txt" \
        --target "$target" --no-gate "${plan[@]}" > /dev/null 2>&1 &
    check_pid=$!
fi

bench=("$py" benchmarks/bench_gpu.py --csv "$out/bench.csv" --no-plot "${bench_common[@]}")
bench_step() {  # NAME BENCH-ARGS...: one benchmark step; its failures set status
    run_step "$1" "${LIMIT[$1]}" TERM - "${bench[@]}" "${@:2}"
    case $rc in
        0 | 124 | 137) ;;
        1) status=1 ;;  # a method was wrong
        *) ((status)) || status=2 ;;
    esac
}
bench_step headline --patterns longnet-lm --seq-lens "${headline_lens[@]}" \
    --methods spattn sdpa gather
bench_step flex --patterns longnet-lm --seq-lens "${flex_lens[@]}" --methods flex \
    --passes "${flex_passes[@]}"
bench_step others --patterns "${others[@]}" --seq-lens "${other_lens[@]}" \
    --methods spattn sdpa gather
finish "$status"
