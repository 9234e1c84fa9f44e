#!/usr/bin/env bash
# attnc's GPU checks and benchmarks on a machine without network access whose python3 has torch and
# Triton but not lark: run from anywhere in the checkout, with lark's wheel in .whl/ (see
# benchmarks/README.md). Nothing is installed into the system: attnc is imported from this checkout.
#
#   bash benchmarks/gpu_run.sh tests [PYTEST ARGS...]   # the kernel tests on the GPU (default: the test
#                                                        # files that launch kernels)
#   bash benchmarks/gpu_run.sh bench [BENCH OPTIONS...]  # attnc bench; options as `attnc bench --help`
#   bash benchmarks/gpu_run.sh decode [DECODE OPTIONS...] # benchmarks/decode.py (paged decoding)
#   bash benchmarks/gpu_run.sh fuzz [SECONDS]            # the fuzz corpus replayed, then `attnc fuzz`
#   bash benchmarks/gpu_run.sh first                     # all four, cut to fit one ~9-minute call
#   bash benchmarks/gpu_run.sh autotune                  # a first call's compile + autotune seconds
#
# Logs and results go to $OUT (default ./out). Each part stops itself before 8 minutes: pytest under
# `timeout`, the benchmark by --time-budget-s (no new case after it; every finished case is already in
# the JSON, rewritten after each one) and `timeout`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"

if ! "$PYTHON" -c "import lark" 2>/dev/null; then
    wheels=(.whl/lark-*.whl)
    if [ ! -e "${wheels[0]}" ]; then
        echo "gpu_run.sh: no lark in $PYTHON and no .whl/lark-*.whl: carry the wheel (benchmarks/README.md)" >&2
        exit 2
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/attnc-site \
        "${wheels[@]}" || exit 2
    export PYTHONPATH=/tmp/attnc-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# Kernel sources and autotuning results: kept between calls while the machine stays warm.
export ATTNC_CACHE_DIR=${ATTNC_CACHE_DIR:-/tmp/attnc-cache}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/environment.txt"

part=${1:-}
shift $(($# > 0 ? 1 : 0))
stamp=$(date +%Y%m%d-%H%M%S)
case "$part" in
tests)
    # Heuristic launch configurations unless asked otherwise: autotuning every shape bucket of the
    # tests would take most of the time; the benchmark checks the autotuned kernels.
    export ATTNC_AUTOTUNE=${ATTNC_AUTOTUNE:-0}
    if [ $# -eq 0 ]; then
        set -- tests/test_kernels.py tests/test_backward.py tests/test_runtime.py tests/test_bench.py
    fi
    timeout 470 "$PYTHON" -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests-$stamp.xml" "$@" 2>&1 |
        tee "$OUT/tests-$stamp.log"
    ;;
bench)
    timeout 470 "$PYTHON" -m attnc bench --time-budget-s 330 --output "$OUT/attention-$stamp.json" "$@" 2>&1 |
        tee "$OUT/bench-$stamp.log"
    ;;
decode)
    timeout 470 "$PYTHON" benchmarks/decode.py --time-budget-s 400 --out "$OUT/decode-$stamp.json" "$@" 2>&1 |
        tee "$OUT/decode-$stamp.log"
    ;;
fuzz)
    seconds=${1:-60}
    timeout 470 "$PYTHON" -m attnc fuzz --replay tests/fuzz_corpus/*.attn 2>&1 | tee "$OUT/fuzz-replay-$stamp.log"
    timeout $((seconds + 120)) "$PYTHON" -m attnc fuzz --seconds "$seconds" --seed 23 --target kernels \
        --save "$OUT/fuzz-failures" 2>&1 | tee "$OUT/fuzz-$stamp.log"
    ;;
autotune)
    # A first call's compile + autotune + run, forward and backward (causal d128 bf16 16K, empty attnc
    # and Triton caches; benchmarks/autotune_compile.py): as built (at most 8 forward and 4 backward
    # candidates, compiled in parallel), then as before (every candidate, each compiled when timed).
    timeout 200 "$PYTHON" benchmarks/autotune_compile.py --first-call \
        --output "$OUT/autotune_compile-first-call-$stamp.json" 2>&1 | tee "$OUT/autotune-$stamp.log"
    timeout 400 "$PYTHON" benchmarks/autotune_compile.py --first-call --candidates all --serial \
        --output "$OUT/autotune_compile-first-call-before-$stamp.json" 2>&1 | tee -a "$OUT/autotune-$stamp.log"
    ;;
first)
    # Issue 23's first visit in one call of about 9 minutes (run with timeout_s ~580): each part under
    # its own limit, in the order of what a GPU alone can show. The speed parts keep every finished case.
    ATTNC_AUTOTUNE=0 timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels.py \
        tests/test_backward.py tests/test_decode.py 2>&1 | tee "$OUT/tests-$stamp.log" | tail -40
    timeout 260 "$PYTHON" -m attnc bench --time-budget-s 200 --lengths 16384 --head-dims 128 \
        --gqa-kv-heads 0 --patterns full causal document_causal block_sparse sliding_window --output "$OUT/attention-$stamp.json" 2>&1 | tee "$OUT/bench-$stamp.log" | tail -40
    timeout 100 "$PYTHON" benchmarks/decode.py --time-budget-s 60 --contexts 4096 32768 \
        --out "$OUT/decode-$stamp.json" 2>&1 | tee "$OUT/decode-$stamp.log" | tail -20
    timeout 60 "$PYTHON" -m attnc fuzz --seconds 40 --seed 23 --target kernels --save "$OUT/fuzz-failures" \
        2>&1 | tee "$OUT/fuzz-$stamp.log" | tail -10
    ;;
*)
    echo "usage: bash benchmarks/gpu_run.sh tests [PYTEST ARGS...] | bench [BENCH OPTIONS...] | decode [...] | fuzz [SECONDS] | autotune | first" >&2
    exit 2
    ;;
esac
