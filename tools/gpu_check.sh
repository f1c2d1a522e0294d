#!/usr/bin/env bash
# The GPU check in one call, on a machine with a CUDA GPU and numpy, cupy, cython, pytest, hypothesis,
# sentencepiece, safetensors (no gguf, no network needed):
#   1. the machine: Python, NumPy, CuPy, the GPU; a C compiler and Python.h for the Cython build;
#   2. build bcnp's Cython kernels in place (if that is impossible or fails, everything below still runs, on the
#      NumPy fallback bcnp warns about);
#   3. time the cold compile of the CUDA kernels (CuPy's kernel cache starts empty) and of CuPy's own kernels in a
#      first forward pass;
#   4. the GPU tests (pytest -m gpu tests/test_gpu_*.py: golden fixtures on CuPy, kernels against their twins, ...),
#      stopping at the first failure;
#   5. Baichuan-13B-width decode at fp16 / int8 / int4 against the memory roofline (tools/gpu_bench.py);
#   6. the backend's CPU tests (strict module, twins, NumPy fallback) on this Python and NumPy, if time is left;
# and last a summary table of the steps. Everything is also written to $OUT/gpu_check.log (./gpu_check.log when
# $OUT is unset): only the end of the output may come back from the machine, the log keeps the first error.
# Each step runs even if an earlier one failed, within an overall budget of $GPU_CHECK_SECONDS (default 460 s);
# the exit status is 1 if any step failed.
#
#   bash tools/gpu_check.sh [gpu_bench.py arguments]        # PYTHON=... to choose the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-.}/gpu_check.log"
mkdir -p "$(dirname "$LOG")"

export PYTHONUNBUFFERED=1                 # output in order, up to the moment a step dies
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"     # this tree's bcnp, not an installed one
CUPY_CACHE="${CUPY_CACHE_DIR:-$HOME/.cupy/kernel_cache}"          # CuPy's compiled kernels (cold on a new machine)
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
BUDGET="${GPU_CHECK_SECONDS:-460}"

names=() results=() seconds=()
failed=0

record() {      # name, result, seconds
    names+=("$1") results+=("$2") seconds+=("$3")
    case "$2" in ok*|skipped*) ;; *) failed=1 ;; esac
}

# step NAME LIMIT COMMAND...: run COMMAND under `timeout`, within what is left of the budget.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if ((left < 15)); then
        echo; echo "=== $name: skipped, the budget of ${BUDGET}s is spent ==="
        record "$name" "skipped (no time left)" 0
        return 1
    fi
    ((limit > left)) && limit=$left
    echo; echo "=== $name (at ${SECONDS}s, limit ${limit}s) ==="
    local start=$SECONDS rc
    timeout "$limit" bash -c '"$@"' step "$@"        # bash: the steps below are exported shell functions
    rc=$?
    local took=$((SECONDS - start))
    if ((rc == 0)); then record "$name" ok "$took"
    elif ((rc == 124)); then record "$name" "TIMED OUT after ${limit}s" "$took"
    else record "$name" "FAILED (exit $rc)" "$took"
    fi
    return $rc
}

build_prerequisites() {
    local include
    command -v "${CC:-gcc}" >/dev/null 2>&1 || command -v cc >/dev/null 2>&1 \
        || { echo "no C compiler (gcc or cc) on PATH: cannot build the Cython kernels"; return 1; }
    include=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])") || return 1
    [ -f "$include/Python.h" ] \
        || { echo "no Python.h in $include (install the python3-dev package): cannot build the Cython kernels"; return 1; }
    "$PY" -c "import Cython; print('Cython', Cython.__version__)" \
        || { echo "Cython is not installed: cannot build the Cython kernels"; return 1; }
    echo "compiler $(command -v "${CC:-gcc}" || command -v cc), $include/Python.h"
}

build() {
    "$PY" setup.py build_ext --inplace -q -j "$(nproc)" \
        && "$PY" -c "import bcnp._quant, bcnp._dtypes; print('built:', bcnp._quant.__file__, bcnp._dtypes.__file__)"
}

machine() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
        || echo "nvidia-smi: not found"
    "$PY" -c "import sys, numpy; print('python', sys.version.split()[0], sys.executable, '| numpy', numpy.__version__)" \
        || return 1
    "$PY" -c "import cupy; print('cupy', cupy.__version__, '| CUDA runtime', cupy.cuda.runtime.runtimeGetVersion(), \
'| devices', cupy.cuda.runtime.getDeviceCount())"
}

cold_compile() {
    local cached
    cached=$(find "$CUPY_CACHE" -type f 2>/dev/null | wc -l)
    echo "CuPy kernel cache $CUPY_CACHE: $cached files before this step"
    "$PY" - <<'EOF'
import time
t = time.perf_counter()
from bcnp import Model
from bcnp.gpu import kernels
from tests.conftest import FIXTURES, MODELS
cupy = kernels.get_cupy()
print(f"import bcnp and cupy: {time.perf_counter() - t:.1f} s", flush=True)
t = time.perf_counter()
kernels.cuda_kernels(cupy)
print(f"compile quant_kernels.cu (NVRTC, options {kernels.NVRTC_OPTIONS} + CuPy's {kernels.CUPY_NVRTC_OPTIONS}): "
      f"{time.perf_counter() - t:.1f} s", flush=True)
model = Model.from_pretrained(FIXTURES / MODELS[0] / "hf").quantize(8).cuda()
for run in ("first (CuPy compiles its elementwise and reduction kernels)", "second (all cached)"):
    t = time.perf_counter()
    cache = model.new_cache(16)
    model.forward(list(range(3, 11)), cache)
    for token in range(3):
        model.forward([token + 5], cache)
    cupy.cuda.Device().synchronize()
    print(f"{run} prefill of 8 tokens + 3 decode steps: {time.perf_counter() - t:.1f} s", flush=True)
EOF
}

export PY CUPY_CACHE
export -f build_prerequisites build machine cold_compile

main() {
    echo "bcnp GPU check, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), log $LOG, python $PY, budget ${BUDGET}s"
    step "machine" 60 machine
    if step "build prerequisites" 30 build_prerequisites; then
        step "build (setup.py build_ext --inplace)" 150 build \
            || echo "the build failed: the steps below run on bcnp's NumPy fallback (see its warning)"
    else
        echo "not building: the steps below run on bcnp's NumPy fallback (see its warning)"
    fi
    step "cold compile" 120 cold_compile
    step "GPU tests (pytest -m gpu)" 170 "$PY" -m pytest -x -q -m gpu --tb=short --durations=15 \
        -p no:cacheprovider tests/test_gpu_*.py
    step "decode benchmark (tools/gpu_bench.py)" 170 "$PY" tools/gpu_bench.py "$@"
    step "backend CPU tests (pytest -m 'not gpu')" 120 "$PY" -m pytest -x -q -m "not gpu" --tb=short \
        --durations=5 -p no:cacheprovider tests/test_gpu_*.py tests/test_numpy_fallback.py

    echo
    echo "=== summary (full log: $LOG) ==="
    printf '%-42s %-28s %6s\n' step result seconds
    local i
    for i in "${!names[@]}"; do
        printf '%-42s %-28s %6s\n' "${names[$i]}" "${results[$i]}" "${seconds[$i]}"
    done
    printf '%-42s %-28s %6s\n' total "$( ((failed)) && echo FAILED || echo ok)" "$SECONDS"
    return $failed
}

main "$@" 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
