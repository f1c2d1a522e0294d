# cython: language_level=3
"""bfloat16 <-> float32, the only dtype NumPy lacks.

bfloat16 is the top half of a float32, so widening is a shift and is exact. Narrowing rounds to nearest even,
the way torch does, and keeps NaN a (quiet) NaN.
"""
from cython.parallel cimport prange
from libc.stdint cimport uint16_t, uint32_t

import numpy as np


def bf16_to_f32(const uint16_t[::1] src not None, float[::1] dst not None):
    """Widen raw bfloat16 bits into float32 (dst must have src's length)."""
    cdef Py_ssize_t i, n = src.shape[0]
    if dst.shape[0] != n:
        raise ValueError(f"bf16_to_f32: dst has {dst.shape[0]} elements, src {n}")
    cdef uint32_t[::1] out = np.asarray(dst).view(np.uint32)
    with nogil:
        for i in prange(n, schedule="static"):
            out[i] = (<uint32_t> src[i]) << 16


def f32_to_bf16(const float[::1] src not None, uint16_t[::1] dst not None):
    """Round float32 to bfloat16 bits, nearest-even; NaN stays NaN."""
    cdef Py_ssize_t i, n = src.shape[0]
    if dst.shape[0] != n:
        raise ValueError(f"f32_to_bf16: dst has {dst.shape[0]} elements, src {n}")
    cdef const uint32_t[::1] bits = np.asarray(src).view(np.uint32)
    cdef uint32_t u
    with nogil:
        for i in prange(n, schedule="static"):
            u = bits[i]
            if (u & 0x7FFFFFFF) > 0x7F800000:
                dst[i] = <uint16_t> ((u >> 16) | 0x40)
            else:
                dst[i] = <uint16_t> ((u + 0x7FFF + ((u >> 16) & 1)) >> 16)
