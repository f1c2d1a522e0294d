"""bcnp: Baichuan-13B/7B in readable NumPy (and CuPy), without PyTorch."""
import os

# OpenBLAS's idle threads spin for 2^OPENBLAS_THREAD_TIMEOUT cycles after each threaded call (its default 2^28, ~0.1 s)
# and take the cores from bcnp's OpenMP kernels that run next, as after every layer's prefill attention: on 2 cores,
# 8 int4 W_pack matvecs took 29 ms right after such a GEMM against 13 ms after a rest, and 13 ms either way with 2^20
# cycles (~0.4 ms, still longer than the gaps between the per-head GEMMs of one numpy matmul); a 128-token int4
# prefill got 7% faster (`python tools/blas_stall.py`, docs/performance.md). OpenBLAS reads this once, when numpy
# loads it: a program that imports numpy before bcnp sets it in its own environment.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

from .api import Model  # noqa: E402

__all__ = ["Model"]
__version__ = "0.1.0"
