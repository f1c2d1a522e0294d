# cython: language_level=3
"""Compiled block-quantization kernels (GGML Q8_0 / Q4_0 on flat arrays); the C lives in quant_kernels.h.

bcnp/quant.py holds the NumPy specification of every function here and is the module to call; these wrappers
check shapes, split rows across OpenMP threads and raise on bad input.  Scales travel as their float16 bits
(uint16), so a float16 array is passed as `scales.view(np.uint16)`.  Inputs are const memoryviews: read-only
memory-mapped weights work without a copy.

threads: 0 = the OMP_NUM_THREADS environment variable if it is set now, else OpenMP's default (all cores).
"""
import os

from cython.parallel cimport prange
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint64_t
cimport openmp

import numpy as np

cdef extern from "quant_kernels.h" nogil:
    const char *bcnp_simd_name()
    float bcnp_f16_to_f32(uint16_t h)
    uint16_t bcnp_f32_to_f16(float f)
    int BCNP_OK, BCNP_NONFINITE, BCNP_SCALE_OVERFLOW
    int bcnp_quantize_row_q8_0(const float *x, int64_t n, int8_t *q, uint16_t *d, int64_t *bad)
    int bcnp_quantize_row_q4_0(const float *x, int64_t n, uint8_t *q, uint16_t *d, int64_t *bad)
    void bcnp_dequantize_row_q8_0(const int8_t *q, const uint16_t *d, int64_t n, float *y)
    void bcnp_dequantize_row_q4_0(const uint8_t *q, const uint16_t *d, int64_t n, float *y)
    int bcnp_activation_limit(int x_bits)
    void bcnp_quantize_activation(const float *x, int64_t n, int limit, int q4_layout, int16_t *xq, float *dx,
                                  int32_t *bias)
    float bcnp_dot_q8_0(const int8_t *w, const uint16_t *d, const int16_t *xq, const float *dx, int64_t nb)
    float bcnp_dot_q4_0(const uint8_t *w, const uint16_t *d, const int16_t *xq, const float *dx,
                        const int32_t *bias, int64_t nb)
    float bcnp_dot_q8_0_scalar(const int8_t *w, const uint16_t *d, const int16_t *xq, const float *dx, int64_t nb)
    float bcnp_dot_q4_0_scalar(const uint8_t *w, const uint16_t *d, const int16_t *xq, const float *dx, int64_t nb)
    uint64_t bcnp_sum_words(const uint64_t *a, int64_t n)

cdef extern from "quant_group.h" nogil:
    int BCNP_GROUPS, BCNP_GROUP_ROWS
    void bcnp_group_q8_0(const int8_t *w, const uint16_t *d, int64_t nb, const int16_t *xq, const float *dx, float *y,
                         int next)
    void bcnp_group_q4_0(const uint8_t *w, const uint16_t *d, int64_t nb, const int16_t *xq, const float *dx,
                         const int32_t *bias, float *y, int next)
    void bcnp_group2_q4_0(const uint8_t *w, const uint16_t *d, int64_t nb, const int16_t *xq0, const float *dx0,
                          const int32_t *bias0, const int16_t *xq1, const float *dx1, const int32_t *bias1,
                          float *y0, float *y1, int next)
    float bcnp_sums_q8_0(const int8_t *w, const uint16_t *d, const int16_t *xq, const float *dx, int64_t nb)
    float bcnp_sums_q4_0(const uint8_t *w, const uint16_t *d, const int16_t *xq, const float *dx, int64_t nb)

cdef extern from "quant_gemm.h" nogil:
    int BCNP_GEMM, BCNP_PANEL_ROWS
    int64_t bcnp_panel_words(int64_t nb)
    void bcnp_pack_panel_q8_0(const int8_t *w, const uint16_t *d, int64_t n, int64_t nb, int32_t *pk, float *dp)
    void bcnp_pack_panel_q4_0(const uint8_t *w, const uint16_t *d, int64_t n, int64_t nb, int32_t *pk, float *dp)
    void bcnp_panel_gemm(const int32_t *pk, const float *dp, int64_t n, int64_t nb, const int16_t *xq,
                         const float *dx, int64_t T, float *y, int64_t ys)
    void bcnp_gemm_q8_0_scalar(const int8_t *w, const uint16_t *d, int64_t rows, int64_t nb, const int16_t *xq,
                               const float *dx, int64_t T, float *y, int64_t ys)
    void bcnp_gemm_q4_0_scalar(const uint8_t *w, const uint16_t *d, int64_t rows, int64_t nb, const int16_t *xq,
                               const float *dx, int64_t T, float *y, int64_t ys)

cdef extern from "quant_amx.h" nogil:
    int BCNP_AMX_BUILT, BCNP_AMX_TOKENS, BCNP_AMX_MAX_TOKENS, BCNP_AMX_ROWS, BCNP_AMX_PAIR_BYTES
    ctypedef struct bcnp_amx_tokens:
        const uint8_t *tiles
        const float *dxp
        const int32_t *ridx
        const int32_t *pick
        int T, P, planes
    int bcnp_amx_enable()
    int bcnp_amx_padded(int T)
    void bcnp_amx_rows(const int8_t *q8, const uint8_t *q4, const uint16_t *d, int64_t nb, int64_t g0, int64_t g1,
                       const bcnp_amx_tokens *xs, int chunks, float *y, int64_t ys)
    void bcnp_amx_prepare(const int16_t *xq, const float *dx, int64_t n, int T, int planes, uint8_t *tiles, float *dxp,
                          int32_t *ridx, int32_t *pick)
    void bcnp_amx_prepare_blocks(const int16_t *xq, const float *dx, int64_t n, int T, int planes, uint8_t *tiles,
                            float *dxp, int N, int32_t *ridx)

cdef extern from "quant_tokens.h" nogil:
    int BCNP_TOKENS, BCNP_TOKENS_MAX
    void bcnp_tokens_x8(const int16_t *xq, int64_t n, int offset, int8_t *x8, int32_t *bias)
    void bcnp_tokens_x16(const int16_t *xq, int64_t n, int16_t *x16)
    void bcnp_tokens_q8_0(const int8_t *w, const uint16_t *d, int64_t nb, const int16_t *xq, const int8_t *x8,
                          const int32_t *bias, const float *dx, int T, float *y, int64_t ys, int next)
    void bcnp_tokens_q4_0(const uint8_t *w, const uint16_t *d, int64_t nb, const int8_t *x8, const int32_t *bias,
                          const float *dx, int T, float *y, int64_t ys, int next)

SIMD = bcnp_simd_name().decode()          # which dot-product implementation was compiled in


include "threads.pxi"


cdef extern from "omp.h" nogil:
    ctypedef enum omp_pause_resource_t:
        omp_pause_soft
    int omp_pause_resource_all(omp_pause_resource_t kind)


def release_threads():
    """Let the calling thread's OpenMP threads go (True when they went); its next kernel starts them again.

    OpenMP keeps a team of threads for each thread that has run a parallel loop, and libgomp spins between two
    loops only while its threads are no more than the cores: past that, every loop waits for its threads to be
    woken. A server that loaded the model on one thread and runs it on another holds two teams; freeing the
    loader's made serve_bench's decode step of 8 take 36 ms instead of 52, and one of 1 20-22 instead of 30
    (2 cores, int4)."""
    return omp_pause_resource_all(omp_pause_soft) == 0


def _check_width(Py_ssize_t n, str what):
    if n <= 0 or n % 32:
        raise ValueError(f"{what}: width {n} is not a positive multiple of 32 (pad rows first)")


def _check_scales(d, Py_ssize_t rows, Py_ssize_t n, str what):
    if d.shape[0] != rows or d.shape[1] != n // 32:
        raise ValueError(f"{what}: scales have shape {tuple(d.shape)[:2]}, expected ({rows}, {n // 32})")


def _check_x_bits(int x_bits, str what):
    if x_bits != 16 and x_bits != 8:
        raise ValueError(f"{what}: x_bits must be 16 or 8, got {x_bits}")


def _raise_on_status(const float[:, ::1] w, int32_t[::1] status, int64_t[::1] bad, str name, int bits):
    cdef Py_ssize_t r
    for r in range(status.shape[0]):
        if status[r] == BCNP_NONFINITE:
            raise ValueError(f"{name}: non-finite value {w[r, bad[r]]} at [{r}, {bad[r]}]; cannot quantize")
        if status[r] == BCNP_SCALE_OVERFLOW:
            c = bad[r]
            block = np.asarray(w[r, c:c + 32])
            raise ValueError(f"{name}: block [{r}, {c}:{c + 32}] has max |w| = {np.abs(block).max()}, too large for a "
                             f"float16 scale at {bits} bits (max |w| < {65504 * (127 if bits == 8 else 8)})")


# ---- quantize / dequantize ------------------------------------------------------------------------------------

def quantize_q8_0(const float[:, ::1] w not None, str name="weight", int threads=0):
    """w (rows, n) float32, n % 32 == 0 -> (q int8 (rows, n), d uint16 float16 bits (rows, n/32))."""
    cdef Py_ssize_t rows = w.shape[0], n = w.shape[1], r
    _check_width(n, name)
    q = np.empty((rows, n), np.int8)
    d = np.empty((rows, n // 32), np.uint16)
    cdef int8_t[:, ::1] qv = q
    cdef uint16_t[:, ::1] dv = d
    cdef int32_t[::1] status = np.zeros(rows, np.int32)
    cdef int64_t[::1] bad = np.zeros(rows, np.int64)
    cdef int nt = resolve_threads(threads)
    with nogil:
        for r in prange(rows, num_threads=nt, schedule="static"):
            status[r] = bcnp_quantize_row_q8_0(&w[r, 0], n, &qv[r, 0], &dv[r, 0], &bad[r])
    _raise_on_status(w, status, bad, name, 8)
    return q, d


def quantize_q4_0(const float[:, ::1] w not None, str name="weight", int threads=0):
    """w (rows, n) float32, n % 32 == 0 -> (q uint8 packed (rows, n/2), d uint16 float16 bits (rows, n/32))."""
    cdef Py_ssize_t rows = w.shape[0], n = w.shape[1], r
    _check_width(n, name)
    q = np.empty((rows, n // 2), np.uint8)
    d = np.empty((rows, n // 32), np.uint16)
    cdef uint8_t[:, ::1] qv = q
    cdef uint16_t[:, ::1] dv = d
    cdef int32_t[::1] status = np.zeros(rows, np.int32)
    cdef int64_t[::1] bad = np.zeros(rows, np.int64)
    cdef int nt = resolve_threads(threads)
    with nogil:
        for r in prange(rows, num_threads=nt, schedule="static"):
            status[r] = bcnp_quantize_row_q4_0(&w[r, 0], n, &qv[r, 0], &dv[r, 0], &bad[r])
    _raise_on_status(w, status, bad, name, 4)
    return q, d


def _output(out, Py_ssize_t rows, Py_ssize_t n, str what):
    if out is None:
        return np.empty((rows, n), np.float32)
    if out.shape[0] != rows or out.shape[1] != n:
        raise ValueError(f"{what}: out has shape {tuple(out.shape)[:2]}, expected ({rows}, {n})")
    return out


def dequantize_q8_0(const int8_t[:, ::1] q not None, const uint16_t[:, ::1] d not None, float[:, ::1] out=None,
                    int threads=0):
    """q int8 (rows, n), d (rows, n/32) float16 bits -> float32 (rows, n), into `out` when given."""
    cdef Py_ssize_t rows = q.shape[0], n = q.shape[1], r
    _check_width(n, "dequantize_q8_0")
    _check_scales(d, rows, n, "dequantize_q8_0")
    y = _output(out, rows, n, "dequantize_q8_0")
    cdef float[:, ::1] yv = y
    cdef int nt = resolve_threads(threads)
    with nogil:
        for r in prange(rows, num_threads=nt, schedule="static"):
            bcnp_dequantize_row_q8_0(&q[r, 0], &d[r, 0], n, &yv[r, 0])
    return np.asarray(y)


def dequantize_q4_0(const uint8_t[:, ::1] q not None, const uint16_t[:, ::1] d not None, float[:, ::1] out=None,
                    int threads=0):
    """q uint8 packed (rows, n/2), d (rows, n/32) float16 bits -> float32 (rows, n), into `out` when given."""
    cdef Py_ssize_t rows = q.shape[0], n = 2 * q.shape[1], r
    _check_width(n, "dequantize_q4_0")
    _check_scales(d, rows, n, "dequantize_q4_0")
    y = _output(out, rows, n, "dequantize_q4_0")
    cdef float[:, ::1] yv = y
    cdef int nt = resolve_threads(threads)
    with nogil:
        for r in prange(rows, num_threads=nt, schedule="static"):
            bcnp_dequantize_row_q4_0(&q[r, 0], &d[r, 0], n, &yv[r, 0])
    return np.asarray(y)


# ---- nibble packing ------------------------------------------------------------------------------------------

def pack_nibbles(const uint8_t[:, ::1] codes not None):
    """codes (rows, n) in 0..15, n % 32 == 0 -> (rows, n/2): byte j of a block = code j | code j+16 << 4."""
    cdef Py_ssize_t rows = codes.shape[0], n = codes.shape[1], r, b, j
    _check_width(n, "pack_nibbles")
    packed = np.empty((rows, n // 2), np.uint8)
    cdef uint8_t[:, ::1] p = packed
    cdef uint8_t too_big = 0
    with nogil:
        for r in range(rows):
            for b in range(n // 32):
                for j in range(16):
                    too_big |= codes[r, 32 * b + j] | codes[r, 32 * b + j + 16]
                    p[r, 16 * b + j] = (codes[r, 32 * b + j] & 0x0F) | (codes[r, 32 * b + j + 16] << 4)
    if too_big > 15:
        raise ValueError("pack_nibbles: codes must lie in 0..15")
    return packed


def unpack_nibbles(const uint8_t[:, ::1] packed not None):
    """The inverse of pack_nibbles: (rows, n/2) -> codes (rows, n)."""
    cdef Py_ssize_t rows = packed.shape[0], n = 2 * packed.shape[1], r, b, j
    _check_width(n, "unpack_nibbles")
    codes = np.empty((rows, n), np.uint8)
    cdef uint8_t[:, ::1] c = codes
    with nogil:
        for r in range(rows):
            for b in range(n // 32):
                for j in range(16):
                    c[r, 32 * b + j] = packed[r, 16 * b + j] & 0x0F
                    c[r, 32 * b + j + 16] = packed[r, 16 * b + j] >> 4
    return codes


# ---- decode matvec: y = W x straight from the blocks -------------------------------------------------------------
#
# Which sums: on AVX-512 builds every kernel here -- the matvec (16-row groups, quant_group.h), a batch of tokens
# (the AMX kernel; without AMX the group matvec or the tokens kernel) and the prefill GEMM -- adds the
# exact integer block products in block order into one float32 accumulator per output: the GEMM's specification
# (bcnp_gemm_q8_0_scalar).  One token gets the same bits alone, in any batch and in a prompt.  Other builds keep
# the lane-wise sums of bcnp_dot_q8_0 / bcnp_dot_q4_0 for the matvec and for batches (the same bits at any batch
# size) and the GEMM's sums for prompts.  simd=False runs bcnp_dot_*_scalar for the matvec and batches (the
# portable specification of the lane-wise kernels) and the GEMM's portable C for prompts.

GROUPS = bool(BCNP_GROUPS)                # the AVX-512 group matvec is compiled in: one kind of sums throughout
# The AMX kernel (quant_amx.h): compiled in (-march=native on a CPU with AMX) and the tile state granted by the Linux
# kernel, asked for once here unless BCNP_AMX=0 is in the environment.  AMX = False (tests and benchmarks set it)
# turns it off; setting it True where it was not granted changes nothing (the tile instructions would trap).
cdef bint _AMX_GRANTED = BCNP_AMX_BUILT and os.environ.get("BCNP_AMX", "1") != "0" and bcnp_amx_enable()
AMX = bool(_AMX_GRANTED)
# Batches of up to this many tokens go through the group matvec (int8 token by token, int4 two at a time; each
# 16-row group stays in L2 between them), larger ones through the AMX kernel, or without it the tokens kernel.
# One 13696 x 5120 weight, 2 threads, token by token (int4 one token at a time then) / AMX / panel GEMM: int4
# 2 tokens 2.8 / 3.4 / 8.5 ms, 4 tokens 7.0 / 3.4 / 9.0, 8 tokens - / 5.3 / 9.6; int8 2 tokens 4.0 / - / 5.7,
# 4 tokens 6.7 / 2.8 / 6.0, 8 tokens - / 4.8 / 8.2.  With int4 two at a time (bcnp_group2_q4_0), the 10 int4
# linears of 2 13B layers, two at a time / AMX: 3 tokens 39.5-41.0 / 50.6-51.5 ms, 4 tokens 45.4-46.7 /
# 51.2-53.8, 5 and 6 tokens even, 8 tokens 74.8-80.6 / 61.6-65.2.  Since int4 weights meet an int8 x (one AMX
# product instead of two), AMX takes int4 from 3 tokens too: two at a time / AMX, min and median of 6 alternated
# rounds, 2 tokens 27.6, 29.5 / 31.4, 31.9 ms; 3 tokens 43.5, 44.9 / 33.7, 34.5; 4 tokens 49.1, 49.6 / 32.8, 35.3.
# Without AMX (Zen 4), the 5 linears of a 13B layer, group matvec / tokens kernel (both fetching the next group
# of rows into L2), best of 6 alternated: int4 2 tokens 6.9 / 8.6 ms, 3 tokens 11.2 / 10.1, 4 tokens 13.0 / 11.1;
# int8 2 tokens 14.4 / 11.4, 3 tokens 21.3 / 13.3, 4 tokens 29.5 / 23.6.
GROUP_TOKENS = {8: 2, 4: 2}                         # by bits
GROUP_TOKENS_WITHOUT_AMX = {8: 1, 4: 2}
# The tokens kernel (quant_tokens.h) is compiled in with the group matvec (AVX-512), and on AVX2 builds for prompts
# only (there one token and decode batches keep the lane-wise sums); TOKENS_KERNEL = False (tests set it)
# sends what it would take to the panel GEMM.  It takes prompts 16 tokens a call up to TOKENS_KERNEL_PROMPT tokens,
# past that the panel GEMM (the same bits): on Zen 4, the 5 linears of a 13B layer, tokens kernel / panel GEMM,
# best of 3 alternated: int4 16 tokens 22.8 / 49.2 ms, 64 tokens 92.1 / 130.4, 128 tokens 191.7 / 247.4; int8
# 16 tokens 41.3 / 73.3, 32 tokens 88.9 / 101.7, 48 tokens 142.1 / 141.3, 64 tokens 175.0 / 158.0, 128 tokens
# 394.7 / 278.6 (its int16 x takes two products per pair of codes, and a panel read from L2 by 6 tokens at a
# time repays its packing over many tokens).  Int8 weights meeting int8 x (an int4 model's lm_head) take one
# product per four codes, as int4 does: 16000 rows of 5120, best of 3 alternated, 32 tokens 9.2 / 17.4 ms, 128
# tokens 37.1 / 45.0, 512 tokens 145.3 / 152.0.  So the line is drawn by the bits of x.  An AVX2 build on Zen 3
# drew it in the same places (quant_tokens.h): int16 x 233 / 335 ms at 32 tokens, 470 / 442 at 64.
TOKENS_KERNEL = bool(BCNP_TOKENS)
TOKENS_KERNEL_PROMPT = {16: 32, 8: 2**62}
# AMX_PROMPT_TOKENS: up to how many tokens a call goes through the AMX kernel (sets of 16 tokens), past that
# through the panel GEMM (the same bits).  int4 always: since 9 to 16 tokens take one pass, one block an
# instruction (bcnp_amx_blocks; before, two passes of 8 over each group of rows, each unpacking the codes and
# moving lanes), the 5 int4 linears of a 13B layer ran at 393-482 GFLOP/s best from 16 to 512 tokens against the
# panel GEMM's 186-248 in the same runs, and against 245-271 for the two passes (best of 4 alternated rounds; the
# two passes had beaten the GEMM only up to 64 tokens, so int4 prompts past 64 went to the GEMM then).  An int16 x
# (int8 weights, two byte planes) stays at 16: the same measurement gave 200-210 against 174-211 from 32 to 64
# tokens, 253 against 285 at 512.  An int8 x (one plane: int4 weights, and an int4 model's int8 lm_head) always.
# Keyed by the bits of x.
AMX_PROMPT_TOKENS = {16: 16, 8: 2**62}
# TOKENS_SPAN_BYTES: the int8 x of the tokens that the tokens kernel takes over one group of rows in turn (16 a
# call), so that the group's rows come from memory once for all of them: 512 KB, within the L2 of every core bcnp
# has run on (Zen 3's 512 KB the smallest), so that the span's x does not push the rows out of L2.  A C harness,
# spans against 16 tokens at a time, alternated in one process (one int4 weight from memory, 2 threads, 10-12
# pairs, best / median ratio; Intel Xeon with 2 MB of L2): 13696 x 5120 (spans of 96) 0.91 / 0.96 at 32 tokens,
# 0.88 / 0.94 at 64, 0.92 / 1.01 at 128, 0.99 / 0.98 at 256; 5120 x 13696 (spans of 32) 0.99 / 0.98 at 32, 0.98 /
# 1.00 at 64, 0.97 / 1.02 at 128, 1.13 / 1.01 at 256.  The whole prompt as one span made the latter 1.10 / 1.01 at
# 128 tokens and 1.10 / 1.06 at 256: 128 tokens' x of 13696 columns is 1.75 MB.
# The AMX kernel takes its sets of 16 tokens in spans by the same bound on their B tiles (a set of 16 int8 tokens
# is as many bytes as their x).  Against one pass over the weight per set, the 5 int4 linears of a 13B layer, 2
# threads, best of 7 (two alternated runs): 17 tokens 29.2 / 29.0 -> 25.7 / 25.5 ms, 20 tokens 29.2 / 29.3 ->
# 27.7 / 27.0, 32 tokens 34.1 -> 32.3 / 31.9, 64 tokens 66.7 / 67.9 -> 63.4 / 63.2, 128 tokens 132.2 / 134.8 ->
# 125.5 / 118.8 (16 tokens 17.0-17.4 either way): past the first set the kernel is bound by its arithmetic, not
# by reading the rows.
TOKENS_SPAN_BYTES = 2**19


def _aligned_empty(Py_ssize_t n, dtype):
    """n elements starting on a 64-byte boundary, so the kernels' 64-byte loads of x never straddle cache lines."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(n * itemsize + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + n * itemsize].view(dtype)


def _matvec_output(out, Py_ssize_t rows):
    if out is None:
        return np.empty(rows, np.float32)
    if out.shape[0] != rows:
        raise ValueError(f"matvec: out has {out.shape[0]} elements, expected {rows}")
    return out


cdef void _rows_q8_0(const int8_t[:, ::1] q, const uint16_t[:, ::1] d, const int16_t *xq, const float *dx,
                     float *y, int nt, bint simd) noexcept nogil:
    """y[r] = row r . x for all rows (x quantized by bcnp_quantize_activation, natural layout)."""
    cdef Py_ssize_t rows = q.shape[0], nb = q.shape[1] // 32, groups = 0, g, r
    if simd and BCNP_GROUPS:
        groups = rows // BCNP_GROUP_ROWS
        for g in prange(groups, num_threads=nt, schedule="guided"):        # guided: as in _tokens_kernel
            bcnp_group_q8_0(&q[g * BCNP_GROUP_ROWS, 0], &d[g * BCNP_GROUP_ROWS, 0], nb, xq, dx, &y[g * BCNP_GROUP_ROWS],
                            g + 1 < groups)
        for r in range(groups * BCNP_GROUP_ROWS, rows):
            y[r] = bcnp_sums_q8_0(&q[r, 0], &d[r, 0], xq, dx, nb)
    else:
        for r in prange(rows, num_threads=nt, schedule="static"):
            if simd:
                y[r] = bcnp_dot_q8_0(&q[r, 0], &d[r, 0], xq, dx, nb)
            else:
                y[r] = bcnp_dot_q8_0_scalar(&q[r, 0], &d[r, 0], xq, dx, nb)


cdef void _rows_q4_0(const uint8_t[:, ::1] q, const uint16_t[:, ::1] d, const int16_t *xq, const float *dx,
                     const int32_t *bias, float *y, int nt, bint simd) noexcept nogil:
    """y[r] = row r . x for all rows (x quantized by bcnp_quantize_activation, Q4_0 layout)."""
    cdef Py_ssize_t rows = q.shape[0], nb = 2 * q.shape[1] // 32, groups = 0, g, r
    if simd and BCNP_GROUPS:
        groups = rows // BCNP_GROUP_ROWS
        for g in prange(groups, num_threads=nt, schedule="guided"):        # guided: as in _tokens_kernel
            bcnp_group_q4_0(&q[g * BCNP_GROUP_ROWS, 0], &d[g * BCNP_GROUP_ROWS, 0], nb, xq, dx, bias,
                            &y[g * BCNP_GROUP_ROWS], g + 1 < groups)
        for r in range(groups * BCNP_GROUP_ROWS, rows):
            y[r] = bcnp_sums_q4_0(&q[r, 0], &d[r, 0], xq, dx, nb)
    else:
        for r in prange(rows, num_threads=nt, schedule="static"):
            if simd:
                y[r] = bcnp_dot_q4_0(&q[r, 0], &d[r, 0], xq, dx, bias, nb)
            else:
                y[r] = bcnp_dot_q4_0_scalar(&q[r, 0], &d[r, 0], xq, dx, nb)


def matvec_q8_0(const int8_t[:, ::1] q not None, const uint16_t[:, ::1] d not None, const float[::1] x not None,
                float[::1] out=None, int threads=0, bint simd=True, int x_bits=16):
    """y (rows,) = W x for W = Q8_0 blocks (q int8 (rows, n), d (rows, n/32)), x float32 (n,) rounded per block to
    x_bits-bit integers (16, or 8 as for Q4_0 weights).
    simd=False runs the portable C kernel (the specification of the lane-wise SIMD one; for tests)."""
    cdef Py_ssize_t rows = q.shape[0], n = q.shape[1], nb = n // 32
    _check_x_bits(x_bits, "matvec_q8_0")
    _check_width(n, "matvec_q8_0")
    _check_scales(d, rows, n, "matvec_q8_0")
    if x.shape[0] != n:
        raise ValueError(f"matvec_q8_0: x has {x.shape[0]} elements, the weight's rows {n}")
    y = _matvec_output(out, rows)
    if rows == 0:
        return np.asarray(y)
    cdef float[::1] yv = y
    cdef int16_t[::1] xq = _aligned_empty(n, np.int16)
    cdef float[::1] dx = _aligned_empty(nb, np.float32)
    cdef int nt = resolve_threads(threads)
    with nogil:
        bcnp_quantize_activation(&x[0], n, bcnp_activation_limit(x_bits), 0, &xq[0], &dx[0], NULL)
        _rows_q8_0(q, d, &xq[0], &dx[0], &yv[0], nt, simd)
    return np.asarray(y)


def matvec_q4_0(const uint8_t[:, ::1] q not None, const uint16_t[:, ::1] d not None, const float[::1] x not None,
                float[::1] out=None, int threads=0, bint simd=True):
    """y (rows,) = W x for W = Q4_0 blocks (q uint8 packed (rows, n/2), d (rows, n/32)), x float32 (n,).
    simd=False runs the portable C kernel (the specification of the lane-wise SIMD one; for tests)."""
    cdef Py_ssize_t rows = q.shape[0], n = 2 * q.shape[1], nb = n // 32
    _check_width(n, "matvec_q4_0")
    _check_scales(d, rows, n, "matvec_q4_0")
    if x.shape[0] != n:
        raise ValueError(f"matvec_q4_0: x has {x.shape[0]} elements, the weight's rows {n}")
    y = _matvec_output(out, rows)
    if rows == 0:
        return np.asarray(y)
    cdef float[::1] yv = y
    cdef int16_t[::1] xq = _aligned_empty(n, np.int16)
    cdef float[::1] dx = _aligned_empty(nb, np.float32)
    cdef int32_t[::1] bias = _aligned_empty(16 * (nb // 4) + 1, np.int32)
    cdef int nt = resolve_threads(threads)
    with nogil:
        bcnp_quantize_activation(&x[0], n, bcnp_activation_limit(8), 1, &xq[0], &dx[0], &bias[0])
        _rows_q4_0(q, d, &xq[0], &dx[0], &bias[0], &yv[0], nt, simd)
    return np.asarray(y)


# ---- batched decode: Y = X W^T for a few tokens, row t bit-identical to the matvec of X[t] ----------------------------

def _batch_output(out, Py_ssize_t T, Py_ssize_t rows, str what):
    if out is None:
        return np.empty((T, rows), np.float32)
    if out.shape[0] != T or out.shape[1] != rows:
        raise ValueError(f"{what}: out has shape {tuple(out.shape)[:2]}, expected ({T}, {rows})")
    return out


def _check_batch(q, d, x, Py_ssize_t n, str what):
    _check_width(n, what)
    _check_scales(d, q.shape[0], n, what)
    if x.shape[1] != n:
        raise ValueError(f"{what}: x has {x.shape[1]} columns, the weight's rows {n}")


cdef _token_by_token(q, const uint16_t[:, ::1] d, const float[:, ::1] x, float[:, ::1] yv, int nt, bint simd,
                     int bits, int x_bits):
    """Each token through the matvec's kernels: on AVX-512 the group matvec, one group of rows for all tokens
    before the next (the group stays in L2; Q4_0 tokens two at a time, sharing the unpacking of the codes: the 10
    int4 linears of 2 13B layers at 2 tokens took 19-24 ms against 32-44 one token after the other, one token
    15-26), else one row for all tokens (the row stays in L1)."""
    cdef Py_ssize_t T = x.shape[0], n = x.shape[1], nb = n // 32, rows = yv.shape[1], g, r, t, bs
    cdef bint grouped = simd and BCNP_GROUPS, q4_layout = bits == 4
    cdef Py_ssize_t groups = rows // BCNP_GROUP_ROWS if grouped else 0, start = groups * BCNP_GROUP_ROWS
    bs = (16 * (nb // 4) + 16) if q4_layout else 0          # a whole number of 64-byte lines per token
    cdef int16_t[::1] xq = _aligned_empty(T * n, np.int16)
    cdef float[::1] dx = _aligned_empty(T * nb + 1, np.float32)
    cdef int32_t[::1] bias = _aligned_empty(T * bs + 1, np.int32)
    cdef const int8_t[:, ::1] q8
    cdef const uint8_t[:, ::1] q4
    if bits == 8:
        q8 = q
    else:
        q4 = q
    with nogil:
        for t in range(T):
            bcnp_quantize_activation(&x[t, 0], n, bcnp_activation_limit(x_bits), q4_layout, &xq[t * n], &dx[t * nb],
                                     &bias[t * bs])
        for g in prange(groups, num_threads=nt, schedule="guided"):        # guided: as in _tokens_kernel
            t = 0
            while bits == 4 and t + 2 <= T:         # Q4_0: two tokens share each unpacking of the codes
                bcnp_group2_q4_0(&q4[g * BCNP_GROUP_ROWS, 0], &d[g * BCNP_GROUP_ROWS, 0], nb, &xq[t * n],
                                 &dx[t * nb], &bias[t * bs], &xq[(t + 1) * n], &dx[(t + 1) * nb],
                                 &bias[(t + 1) * bs], &yv[t, g * BCNP_GROUP_ROWS], &yv[t + 1, g * BCNP_GROUP_ROWS],
                                 t == 0 and g + 1 < groups)
                t = t + 2
            while t < T:
                if bits == 8:
                    bcnp_group_q8_0(&q8[g * BCNP_GROUP_ROWS, 0], &d[g * BCNP_GROUP_ROWS, 0], nb, &xq[t * n],
                                    &dx[t * nb], &yv[t, g * BCNP_GROUP_ROWS], t == 0 and g + 1 < groups)
                else:
                    bcnp_group_q4_0(&q4[g * BCNP_GROUP_ROWS, 0], &d[g * BCNP_GROUP_ROWS, 0], nb, &xq[t * n],
                                    &dx[t * nb], &bias[t * bs], &yv[t, g * BCNP_GROUP_ROWS],
                                    t == 0 and g + 1 < groups)
                t = t + 1
        for r in prange(start, rows, num_threads=nt, schedule="static"):
            for t in range(T):
                if bits == 8:
                    if grouped:
                        yv[t, r] = bcnp_sums_q8_0(&q8[r, 0], &d[r, 0], &xq[t * n], &dx[t * nb], nb)
                    elif simd:
                        yv[t, r] = bcnp_dot_q8_0(&q8[r, 0], &d[r, 0], &xq[t * n], &dx[t * nb], nb)
                    else:
                        yv[t, r] = bcnp_dot_q8_0_scalar(&q8[r, 0], &d[r, 0], &xq[t * n], &dx[t * nb], nb)
                else:
                    if grouped:
                        yv[t, r] = bcnp_sums_q4_0(&q4[r, 0], &d[r, 0], &xq[t * n], &dx[t * nb], nb)
                    elif simd:
                        yv[t, r] = bcnp_dot_q4_0(&q4[r, 0], &d[r, 0], &xq[t * n], &dx[t * nb], &bias[t * bs], nb)
                    else:
                        yv[t, r] = bcnp_dot_q4_0_scalar(&q4[r, 0], &d[r, 0], &xq[t * n], &dx[t * nb], nb)


def _tokens(q, const uint16_t[:, ::1] d, const float[:, ::1] x, out, int threads, bint simd, int bits, str kind,
            int x_bits=8):
    """matmul_* (kind "matmul": a batch, the matvec's kernels or the GEMM's where those give the same bits) and
    prefill_* (kind "prefill": the GEMM)."""
    cdef Py_ssize_t rows = q.shape[0], n = q.shape[1] * (1 if bits == 8 else 2), T = x.shape[0]
    cdef str what = f"{kind}_q{bits}_0"
    _check_x_bits(x_bits, what)
    _check_batch(q, d, x, n, what)
    y = _batch_output(out, T, rows, what)
    if T == 0 or rows == 0:
        return np.asarray(y)
    cdef int nt = resolve_threads(threads)
    if kind == "prefill" or (simd and GROUPS and
                             T > (GROUP_TOKENS if AMX and _AMX_GRANTED else GROUP_TOKENS_WITHOUT_AMX)[bits]):
        _gemm(q, d, x, y, nt, bits, x_bits, simd)
    else:
        _token_by_token(q, d, x, y, nt, simd, bits, x_bits)
    return np.asarray(y)


def matmul_q8_0(const int8_t[:, ::1] q not None, const uint16_t[:, ::1] d not None, const float[:, ::1] x not None,
                float[:, ::1] out=None, int threads=0, bint simd=True, int x_bits=16):
    """Y (T, rows) = X W^T for W = Q8_0 blocks (as matvec_q8_0), X float32 (T, n), a few tokens: every block of W is
    read from memory once for all T tokens, and Y[t] equals matvec_q8_0(q, d, X[t], x_bits=x_bits) bit for bit.
    simd=False: the portable kernel per token."""
    return _tokens(q, d, x, out, threads, simd, 8, "matmul", x_bits)


def matmul_q4_0(const uint8_t[:, ::1] q not None, const uint16_t[:, ::1] d not None, const float[:, ::1] x not None,
                float[:, ::1] out=None, int threads=0, bint simd=True):
    """matmul_q8_0 for Q4_0 blocks (q uint8 packed (rows, n/2))."""
    return _tokens(q, d, x, out, threads, simd, 4, "matmul")


# ---- prefill: Y = X W^T for many tokens, integer block sums of the rounded activations ----------------------------

GEMM = bool(BCNP_GEMM)                    # a SIMD prefill kernel is compiled in (else only the portable C)


cdef _natural_activations(const float[:, ::1] x, int nt, int x_bits):
    """X (T, n) -> (xq int16 (T, n), dx float32 (T, n/32)), rounded to x_bits-bit integers as the matvec rounds
    it, natural layout."""
    cdef Py_ssize_t T = x.shape[0], n = x.shape[1], nb = n // 32, t
    cdef int limit = bcnp_activation_limit(x_bits)
    xq = _aligned_empty(T * n, np.int16)
    dx = _aligned_empty(T * nb + 1, np.float32)
    cdef int16_t[::1] xv = xq
    cdef float[::1] dv = dx
    with nogil:
        for t in prange(T, num_threads=nt, schedule="static"):
            bcnp_quantize_activation(&x[t, 0], n, limit, 0, &xv[t * n], &dv[t * nb], NULL)
    return xq, dx


cdef void _rows_past_the_groups(const int8_t[:, ::1] q8, const uint8_t[:, ::1] q4, const uint16_t[:, ::1] d,
                                const int16_t[::1] xv, const float[::1] dv, Py_ssize_t nb, Py_ssize_t T,
                                float[:, ::1] yv, Py_ssize_t k, int bits) noexcept nogil:
    """Rows k .. of Y = X W^T (those past the last whole group of 16) by the portable C, which adds the kernels'
    terms in their order."""
    cdef Py_ssize_t rows = yv.shape[1]
    if k < rows:
        if bits == 8:
            bcnp_gemm_q8_0_scalar(&q8[k, 0], &d[k, 0], rows - k, nb, &xv[0], &dv[0], T, &yv[0, k], rows)
        else:
            bcnp_gemm_q4_0_scalar(&q4[k, 0], &d[k, 0], rows - k, nb, &xv[0], &dv[0], T, &yv[0, k], rows)


cdef _amx(const int8_t[:, ::1] q8, const uint8_t[:, ::1] q4, const uint16_t[:, ::1] d, const int16_t[::1] xv,
          const float[::1] dv, Py_ssize_t n, Py_ssize_t T, float[:, ::1] yv, int nt, int bits, int x_bits):
    """Y = X W^T by the AMX kernel for the rows in whole groups of 16, the tokens in sets of 16 (up to 4 tokens two
    blocks an instruction, 5 to 16 one block an instruction): a group of rows takes the sets of a span in turn, a
    span's B tiles within TOKENS_SPAN_BYTES (so they stay in L2 beside the rows); the rest by the portable C, which
    adds the same terms in the same order."""
    cdef Py_ssize_t rows = yv.shape[1], nb = n // 32, groups = rows // BCNP_AMX_ROWS, g0, g1
    cdef int i, na = max(1, min(nt, groups)), planes = 2 if x_bits == 16 else 1, P
    # The groups in 8 pieces a thread, taken in turn (dynamic): a thread that another takes the core from (a
    # server's handlers and clients, on 2 cores) does fewer of them, where halves fixed in advance kept the other
    # thread waiting at the end of every linear (as in _tokens_kernel).  Engine steps of 8 int4 sequences (2 layers
    # of 13B width, Xeon with AMX, 2 threads) beside 8 Python threads busy 10% of the time each (as tools/bench.py
    # batch --busy 8), medians of 40 steps, three alternated runs: 96, 118, 112 ms in halves against 87, 87, 78 in
    # pieces (with the matvec's and attention's guided loops); alone 33.1-34.4 against 33.4-35.4.  serve_bench's
    # clients load the cores less: its tokens/s did not move (8 clients 190 and 193 against 188 and 197).
    cdef int pieces = <int>min(groups, 8 * na)
    cdef const int8_t *p8 = &q8[0, 0] if bits == 8 else NULL
    cdef const uint8_t *p4 = &q4[0, 0] if bits == 4 else NULL
    cdef Py_ssize_t sets = (T + BCNP_AMX_MAX_TOKENS - 1) // BCNP_AMX_MAX_TOKENS, s0, s1, c, j, t0, k
    cdef Py_ssize_t P0 = bcnp_amx_padded(<int>min(T, BCNP_AMX_MAX_TOKENS))
    cdef Py_ssize_t pair_bytes = BCNP_AMX_PAIR_BYTES * ((nb + 1) // 2)                # the tiles of P <= 4
    cdef Py_ssize_t set_bytes = (32 * P0 * planes * nb if P0 >= 8 else pair_bytes) if sets == 1 else \
        max(32 * BCNP_AMX_MAX_TOKENS * planes * nb, pair_bytes)      # room for a last set of any P
    cdef Py_ssize_t span = max(1, min(sets, TOKENS_SPAN_BYTES // set_bytes))
    cdef Py_ssize_t dxp_floats = 16 * BCNP_AMX_TOKENS * nb          # a set's dxp at any P (P <= 4: 16 P nb; else 16 nb)
    if groups:
        tiles_buffer = _aligned_empty(span * set_bytes, np.uint8)
        dxp_buffer = _aligned_empty(span * dxp_floats, np.float32)
        ridx_buffer = _aligned_empty(span * 16 * BCNP_AMX_TOKENS, np.int32)
        pick_buffer = _aligned_empty(span * 32, np.int32)
        sets_buffer = _aligned_empty(span * sizeof(bcnp_amx_tokens), np.uint8)      # the sets' structs
    cdef uint8_t[::1] tiles = tiles_buffer if groups else None
    cdef float[::1] dxp = dxp_buffer if groups else None
    cdef int32_t[::1] ridx = ridx_buffer if groups else None
    cdef int32_t[::1] pick = pick_buffer if groups else None
    cdef uint8_t[::1] structs = sets_buffer if groups else None
    cdef bcnp_amx_tokens *xs = <bcnp_amx_tokens *>&structs[0] if groups else NULL
    with nogil:
        if groups:
            s0 = 0
            while s0 < sets:
                s1 = min(sets, s0 + span)
                for c in range(s0, s1):
                    j = c - s0
                    t0 = c * BCNP_AMX_MAX_TOKENS
                    k = min(<Py_ssize_t>BCNP_AMX_MAX_TOKENS, T - t0)
                    P = bcnp_amx_padded(<int>k)
                    if P >= 8:
                        bcnp_amx_prepare_blocks(&xv[t0 * n], &dv[t0 * nb], n, <int>k, planes, &tiles[j * set_bytes],
                                                &dxp[j * dxp_floats], P, &ridx[j * 16 * BCNP_AMX_TOKENS])
                    else:
                        bcnp_amx_prepare(&xv[t0 * n], &dv[t0 * nb], n, <int>k, planes, &tiles[j * set_bytes],
                                         &dxp[j * dxp_floats], &ridx[j * 16 * BCNP_AMX_TOKENS], &pick[j * 32])
                    xs[j].tiles, xs[j].dxp = &tiles[j * set_bytes], &dxp[j * dxp_floats]
                    xs[j].ridx, xs[j].pick = &ridx[j * 16 * BCNP_AMX_TOKENS], &pick[j * 32]
                    xs[j].T, xs[j].P, xs[j].planes = <int>k, P, planes
                for i in prange(pieces, num_threads=na, schedule="dynamic", chunksize=1):
                    g0 = groups * i // pieces
                    g1 = groups * (i + 1) // pieces
                    bcnp_amx_rows(p8, p4, &d[0, 0], nb, g0, g1, xs, <int>(s1 - s0),
                                  &yv[s0 * BCNP_AMX_MAX_TOKENS, 0], rows)
                s0 = s1
        _rows_past_the_groups(q8, q4, d, xv, dv, nb, T, yv, groups * BCNP_AMX_ROWS, bits)


cdef _tokens_kernel(const int8_t[:, ::1] q8, const uint8_t[:, ::1] q4, const uint16_t[:, ::1] d,
                 const int16_t[::1] xv, const float[::1] dv, Py_ssize_t n, Py_ssize_t T, float[:, ::1] yv, int nt,
                 int bits, int x_bits):
    """Y = X W^T by the tokens kernel (quant_tokens.h) for the rows in whole groups of 16, BCNP_TOKENS_MAX tokens
    a call; the rest by the portable C, which adds the same terms in the same order."""
    cdef Py_ssize_t rows = yv.shape[1], nb = n // 32, groups = rows // BCNP_GROUP_ROWS, g, t, c, t0, r0, s, s0, s1, k
    cdef bint ahead
    cdef Py_ssize_t span = max(BCNP_TOKENS_MAX, TOKENS_SPAN_BYTES // n // BCNP_TOKENS_MAX * BCNP_TOKENS_MAX)
    cdef bint x8_kernel = x_bits == 8
    cdef int8_t[::1] x8 = _aligned_empty(T * n if x8_kernel else 1, np.int8)
    cdef int32_t[::1] bias = _aligned_empty(T * nb + 1 if x8_kernel else 1, np.int32)
    cdef int16_t[::1] x16 = _aligned_empty(T * n if not x8_kernel else 1, np.int16)
    with nogil:
        for t in range(T):
            if x8_kernel:
                bcnp_tokens_x8(&xv[t * n], n, 8 if bits == 4 else 128, &x8[t * n], &bias[t * nb])
            else:
                bcnp_tokens_x16(&xv[t * n], n, &x16[t * n])
        # guided: a thread that another takes the core from (a server's handlers, on 2 cores) does fewer groups.
        # Steps of 8 int4 sequences (2 layers of 13B width), the schedule switched every 10 steps in one process
        # (Intel Xeon, 2 threads), two runs, medians: in the server with 8 streaming clients 48.5 and 47.1 ms
        # against static's 50.0 and 49.7; the engine alone 41.5 and 42.3 against 44.9 and 44.0; 128-token
        # prompts the same (int4 480 / 524 ms min / median against 476 / 548).
        # Past 16 tokens, a group's rows take every 16 tokens of a span in turn (the first call also fetches the
        # next group's rows), so they are read from memory once a span and then from L2; each 16 tokens used to
        # stream the whole weight again.  A span's int8 x stays within TOKENS_SPAN_BYTES.
        for s in range((T + span - 1) // span):
            s0 = s * span
            s1 = min(T, s0 + span)
            for g in prange(groups, num_threads=nt, schedule="guided"):
                r0 = g * BCNP_GROUP_ROWS
                for c in range((s1 - s0 + BCNP_TOKENS_MAX - 1) // BCNP_TOKENS_MAX):
                    t0 = s0 + c * BCNP_TOKENS_MAX
                    k = min(BCNP_TOKENS_MAX, s1 - t0)
                    ahead = c == 0 and g + 1 < groups
                    if bits == 8 and x8_kernel:
                        bcnp_tokens_q8_0(&q8[r0, 0], &d[r0, 0], nb, NULL, &x8[t0 * n], &bias[t0 * nb], &dv[t0 * nb],
                                         <int>k, &yv[t0, r0], rows, ahead)
                    elif bits == 8:
                        bcnp_tokens_q8_0(&q8[r0, 0], &d[r0, 0], nb, &x16[t0 * n], &x8[0], &bias[0], &dv[t0 * nb],
                                         <int>k, &yv[t0, r0], rows, ahead)
                    else:
                        bcnp_tokens_q4_0(&q4[r0, 0], &d[r0, 0], nb, &x8[t0 * n], &bias[t0 * nb], &dv[t0 * nb], <int>k,
                                         &yv[t0, r0], rows, ahead)
        _rows_past_the_groups(q8, q4, d, xv, dv, nb, T, yv, groups * BCNP_GROUP_ROWS, bits)


cdef _gemm(q, const uint16_t[:, ::1] d, const float[:, ::1] x, float[:, ::1] yv, int nt, int bits, int x_bits,
           bint simd=True):
    """Y = X W^T with the GEMM's sums: the AMX kernel, the panel GEMM, or their portable C (simd=False, or neither
    compiled in).  Those take x as int16, so an x rounded to int8 goes through them unchanged: its block sums are
    the same integers."""
    cdef Py_ssize_t rows = q.shape[0], n = x.shape[1], nb = n // 32, T = x.shape[0]
    cdef Py_ssize_t panel, r0, k
    xq, dx = _natural_activations(x, nt, x_bits)
    cdef int16_t[::1] xv = xq
    cdef float[::1] dv = dx
    cdef const int8_t[:, ::1] q8 = q if bits == 8 else None
    cdef const uint8_t[:, ::1] q4 = q if bits == 4 else None
    if simd and AMX and _AMX_GRANTED and T <= AMX_PROMPT_TOKENS[x_bits]:
        _amx(q8, q4, d, xv, dv, n, T, yv, nt, bits, x_bits)
        return
    if simd and TOKENS_KERNEL and BCNP_TOKENS and T <= TOKENS_KERNEL_PROMPT[x_bits]:
        _tokens_kernel(q8, q4, d, xv, dv, n, T, yv, nt, bits, x_bits)
        return
    cdef Py_ssize_t panels = (rows + BCNP_PANEL_ROWS - 1) // BCNP_PANEL_ROWS, words = bcnp_panel_words(nb)
    cdef bint gemm = simd and BCNP_GEMM
    cdef int32_t[::1] packed = _aligned_empty(nt * words if gemm else 1, np.int32)
    cdef float[::1] scales = _aligned_empty(nt * 32 * nb if gemm else 1, np.float32)
    cdef int32_t *pk
    cdef float *dp
    with nogil:
        for panel in prange(panels, num_threads=nt, schedule="dynamic"):
            r0 = panel * BCNP_PANEL_ROWS
            k = min(BCNP_PANEL_ROWS, rows - r0)
            if gemm:
                pk = &packed[openmp.omp_get_thread_num() * words]
                dp = &scales[openmp.omp_get_thread_num() * 32 * nb]
                if bits == 8:
                    bcnp_pack_panel_q8_0(&q8[r0, 0], &d[r0, 0], k, nb, pk, dp)
                else:
                    bcnp_pack_panel_q4_0(&q4[r0, 0], &d[r0, 0], k, nb, pk, dp)
                bcnp_panel_gemm(pk, dp, k, nb, &xv[0], &dv[0], T, &yv[0, r0], rows)
            elif bits == 8:
                bcnp_gemm_q8_0_scalar(&q8[r0, 0], &d[r0, 0], k, nb, &xv[0], &dv[0], T, &yv[0, r0], rows)
            else:
                bcnp_gemm_q4_0_scalar(&q4[r0, 0], &d[r0, 0], k, nb, &xv[0], &dv[0], T, &yv[0, r0], rows)


def prefill_q8_0(const int8_t[:, ::1] q not None, const uint16_t[:, ::1] d not None, const float[:, ::1] x not None,
                 float[:, ::1] out=None, int threads=0, bint simd=True, int x_bits=16):
    """Y (T, rows) = X W^T for W = Q8_0 blocks, X float32 (T, n), many tokens: X rounded per token and block
    as matvec_q8_0 does (x_bits: int16 or int8; int8 for prefill_q4_0, as matvec_q4_0), exact integer block sums,
    one float32 sum over the blocks per output in block order
    (on AVX-512 builds the matvec's own sums; elsewhere within its error bound).  simd=False: the portable kernel,
    bit-identical to the SIMD one."""
    return _tokens(q, d, x, out, threads, simd, 8, "prefill", x_bits)


def prefill_q4_0(const uint8_t[:, ::1] q not None, const uint16_t[:, ::1] d not None, const float[:, ::1] x not None,
                 float[:, ::1] out=None, int threads=0, bint simd=True):
    """prefill_q8_0 for Q4_0 blocks (q uint8 packed (rows, n/2))."""
    return _tokens(q, d, x, out, threads, simd, 4, "prefill")


# ---- helpers for tests and benchmarks ------------------------------------------------------------------------

def activation_limit(int x_bits):
    """L of the activation's rounding to x_bits-bit integers (dx = max|x_b| / L; bcnp.quant.ACTIVATION_LIMIT)."""
    _check_x_bits(x_bits, "activation_limit")
    return bcnp_activation_limit(x_bits)


def f32_to_f16_bits(const float[::1] x not None):
    """float32 -> float16 bits, nearest even: the conversion the quantizers use for scales."""
    out = np.empty(x.shape[0], np.uint16)
    cdef uint16_t[::1] o = out
    cdef Py_ssize_t i
    with nogil:
        for i in range(x.shape[0]):
            o[i] = bcnp_f32_to_f16(x[i])
    return out


def f16_bits_to_f32(const uint16_t[::1] h not None):
    out = np.empty(h.shape[0], np.float32)
    cdef float[::1] o = out
    cdef Py_ssize_t i
    with nogil:
        for i in range(h.shape[0]):
            o[i] = bcnp_f16_to_f32(h[i])
    return out


def stream_read(const uint64_t[::1] a not None, int threads=0):
    """Sum of all words of `a`, each thread streaming one contiguous slice: a memory read-bandwidth probe."""
    cdef int nt = resolve_threads(threads), t
    cdef Py_ssize_t n = a.shape[0], lo, hi
    cdef uint64_t[::1] partial = np.zeros(nt, np.uint64)
    if n == 0:
        return 0
    with nogil:
        for t in prange(nt, num_threads=nt, schedule="static", chunksize=1):
            lo = n * t // nt
            hi = n * (t + 1) // nt
            partial[t] = bcnp_sum_words(&a[lo], hi - lo)
    return int(np.asarray(partial).sum())
