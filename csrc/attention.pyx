# cython: language_level=3
"""Compiled attention over a float16 KV cache, and the cache's store; the C lives in attention.h.

bcnp/attention.py holds the NumPy specification and is the module to call; this wrapper checks shapes and splits
the heads across OpenMP threads (each thread owns whole heads, so it reads each head's keys and values once per
query row). Keys and values travel as their float16 bits (uint16): pass `k.view(np.uint16)`.

threads: 0 = the OMP_NUM_THREADS environment variable if it is set now, else OpenMP's default (all cores).
"""
import os

from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint16_t
cimport openmp

import numpy as np

cdef extern from "attention.h" nogil:
    int BCNP_ATTENTION_SCALAR, BCNP_ATTENTION_AVX2_PATH, BCNP_ATTENTION_AVX512_PATH
    int bcnp_attention_paths()
    void bcnp_attend_row(int path, const float *q, const uint16_t *k, const uint16_t *v, const float *bias,
                         int64_t S, int64_t hd, float sqrt_hd, float *e, float *out)
    void bcnp_store_f16(const float *src, int64_t n, uint16_t *dst)

_PATH_IDS = {"avx512": BCNP_ATTENTION_AVX512_PATH, "avx2": BCNP_ATTENTION_AVX2_PATH, "scalar": BCNP_ATTENTION_SCALAR}
PATHS = tuple(name for name, bit in _PATH_IDS.items() if bcnp_attention_paths() & (1 << bit))   # best first
SIMD = PATHS[0]


include "threads.pxi"


def _check_rows_contiguous(a, str what):
    if a.shape[2] > 1 and a.strides[2] != 4:
        raise ValueError(f"attend_f16: {what} must have contiguous rows (last stride 4), got strides {a.strides}")


def attend_f16(const float[:, :, :] q not None, const uint16_t[:, :, ::1] k not None,
               const uint16_t[:, :, ::1] v not None, const float[:, :, :] bias not None,
               out=None, int threads=0, str path=SIMD):
    """softmax(q kᵀ/√hd + bias) v per head over the first S = bias.shape[2] positions of the cache.

    q (nh, T, hd) float32; k, v (nh, max_len, hd) float16 bits (one layer of the cache, max_len >= S);
    bias (nh or 1, T, S) float32 -> out (nh, T, hd) float32. q and bias may be strided views whose last axis is
    contiguous (slices of the forward's arrays)."""
    cdef Py_ssize_t nh = q.shape[0], T = q.shape[1], hd = q.shape[2], S = bias.shape[2]
    if k.shape[0] != nh or v.shape[0] != nh or k.shape[2] != hd or v.shape[2] != hd:
        raise ValueError(f"attend_f16: q {tuple(q.shape)[:3]} and keys {tuple(k.shape)[:3]} / values "
                         f"{tuple(v.shape)[:3]} must have the same heads and head_dim")
    if S < 1 or S > k.shape[1] or S > v.shape[1]:
        raise ValueError(f"attend_f16: bias attends to {S} positions; the cache holds {k.shape[1]}")
    if bias.shape[1] != T or bias.shape[0] not in (1, nh):
        raise ValueError(f"attend_f16: bias {tuple(bias.shape)[:3]} does not fit q {tuple(q.shape)[:3]}")
    if path not in PATHS:
        raise ValueError(f"attend_f16: path {path!r} is not in this build ({', '.join(PATHS)})")
    _check_rows_contiguous(q, "q")
    _check_rows_contiguous(bias, "bias")
    if out is None:
        out = np.empty((nh, T, hd), np.float32)
    elif out.shape != (nh, T, hd) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"attend_f16: out must be C-contiguous float32 {(nh, T, hd)}")
    if nh == 0 or T == 0 or hd == 0:
        return out
    cdef int p = _PATH_IDS[path], nt = resolve_threads(threads)
    cdef float[:, :, ::1] o = out
    cdef float[:, ::1] scores = np.empty((nt, S), np.float32)         # one row's scores per thread
    cdef Py_ssize_t h, t, hb, shared_bias = bias.shape[0] == 1
    cdef float sqrt_hd = np.sqrt(np.float32(hd))
    with nogil:
        for h in prange(nh, num_threads=nt, schedule="guided"):     # guided: as bcnp._quant's kernels
            hb = 0 if shared_bias else h
            for t in range(T):
                bcnp_attend_row(p, &q[h, t, 0], &k[h, 0, 0], &v[h, 0, 0], &bias[hb, t, 0], S, hd, sqrt_hd,
                                &scores[openmp.omp_get_thread_num(), 0], &o[h, t, 0])
    return out


def store_f16(src not None, uint16_t[:, :, ::1] dst not None, Py_ssize_t start):
    """dst[h, start + t] = src[t, h] as float16 bits, limited to float16's finite range, nearest even (NaN stays
    NaN): new keys or values src (T, nh, hd) float32 (any strides; rows with contiguous elements are read in
    place) into one layer of a float16 cache, dst (nh, max_len, hd) (`k.view(np.uint16)`)."""
    src = np.asarray(src, np.float32)
    if src.ndim != 3:
        raise ValueError(f"store_f16: src must be (T, heads, head_dim), got shape {src.shape}")
    if src.shape[2] > 1 and src.strides[2] != 4:
        src = np.ascontiguousarray(src)
    cdef const float[:, :, :] s = src
    cdef Py_ssize_t T = s.shape[0], nh = s.shape[1], hd = s.shape[2], t, h
    if dst.shape[0] != nh or dst.shape[2] != hd:
        raise ValueError(f"store_f16: src {tuple(src.shape)} (T, heads, head_dim) does not fit the cache's "
                         f"{tuple(dst.shape)[:3]} (heads, positions, head_dim)")
    if start < 0 or start + T > dst.shape[1]:
        raise ValueError(f"store_f16: positions {start} to {start + T} are outside the cache's {dst.shape[1]}")
    if T == 0 or nh == 0 or hd == 0:
        return
    with nogil:
        for t in range(T):
            for h in range(nh):
                bcnp_store_f16(&s[t, h, 0], hd, &dst[h, start + t, 0])
