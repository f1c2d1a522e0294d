#!/usr/bin/env bash
# The GPU check in one call, on a machine with a CUDA GPU and numpy, cupy, cython, pytest, hypothesis,
# sentencepiece, safetensors installed (no network needed):
#   1. build bcnp's Cython kernels in place,
#   2. run the GPU tests (pytest -m gpu tests/test_backend.py, where they all are, so a test module needing a
#      package the image lacks, gguf say, cannot stop them: golden fixtures on CuPy, kernels against twins, ...),
#   3. benchmark Baichuan-13B-width decode at fp16 / int8 / int4 against the memory roofline (tools/gpu_bench.py),
#      ending with a short table.
# Every step runs even if an earlier one failed; the exit status is 1 if any did. About 3 minutes, at most 8.
#
#   bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
step() { echo; echo "=== $* ==="; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: not found"
python -c "import sys, numpy, cupy; print('python', sys.version.split()[0], '| numpy', numpy.__version__, \
'| cupy', cupy.__version__, '| CUDA runtime', cupy.cuda.runtime.runtimeGetVersion())" || status=1

step "build (python setup.py build_ext --inplace)"
timeout 120 python setup.py build_ext --inplace -q -j "$(nproc)" || status=1

step "CuPy sees the GPU (else the GPU tests below would only be skipped)"
python -c "from bcnp.backend import get_cupy; c = get_cupy(); print('ok:', c.cuda.runtime.getDeviceCount(), 'device(s)')" \
    || status=1

step "GPU tests (pytest -m gpu)"
timeout 180 python -m pytest -q -m gpu --tb=short -p no:cacheprovider tests/test_backend.py || status=1

step "decode benchmark (tools/gpu_bench.py)"
timeout 170 python tools/gpu_bench.py "$@" || status=1

exit $status
