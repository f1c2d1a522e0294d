"""The KV cache: keys and values of every layer, stored as the forward pass appends tokens (bcnp.forward).

Shapes: T new tokens, S = tokens in the cache after appending them, nh heads, hd head_dim.
"""
import math
import mmap
import numbers
from dataclasses import dataclass

import numpy as np

from .forward import attention
from .quant import _attention


# --- the KV cache ----------------------------------------------------------------------------------------------

# Attention over a float16 cache on the CPU reads it as stored, in bcnp._attention (csrc/attention.pyx); without
# that module (bcnp.quant says so once) it runs the specification: `attention` on the keys and values widened to
# float32.
FLOAT16_MAX = 65504.0
CACHE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


@dataclass
class KVCache:
    """Keys and values of every layer for positions [0, length), preallocated for the whole context.

    Layout (layers, nh, max_len, hd), as in the original, so each head's keys are contiguous. On the CPU
    np.zeros maps untouched pages lazily: a 4096-token 13B cache costs memory only as it fills.
    A step of T new tokens: `positions` says where they go, each layer `store`s their keys and values and
    `attend`s over the first `span` positions, then `advance(T)` counts them in.

    float32 (the reference) or float16 (half the memory and half the bytes each decode step reads: the default of
    quantized models). A float16 cache stores keys and values rounded to nearest, limited to float16's finite range
    (a value beyond 65504 would be infinity and make its head's scores NaN; other float16 engines clamp too), and
    every step attends over the stored values, so a prompt gives the same logits in any split into steps."""
    k: object
    v: object
    length: int = 0

    @property
    def max_len(self):
        return self.k.shape[2]

    def positions(self, xp, T):
        """(T,) positions of T new tokens: right after what the cache holds."""
        if self.length + T > self.max_len:
            raise ValueError(f"{self.length} cached + {T} new tokens exceed the context of {self.max_len}")
        return xp.arange(self.length, self.length + T)

    def span(self, T):
        """How many cached positions the new tokens attend to (the causal mask hides their own future)."""
        return self.length + T

    def advance(self, T):
        """The T new tokens are stored in every layer: they are cached now."""
        self.length += T

    def store(self, i, k, v):
        """Layer i's keys and values (T, nh, hd) of the new tokens."""
        start, end = self.length, self.length + k.shape[0]
        if self.k.dtype == np.float16 and isinstance(self.k, np.ndarray) and _attention is not None:
            # the same bits as the two lines below, which cost 100 us a token and layer at 13B width (NumPy's
            # float16 cast), 1.6 ms of an 8-sequence decode step of 2 layers
            _attention.store_f16(k, self.k[i].view(np.uint16), start)
            _attention.store_f16(v, self.v[i].view(np.uint16), start)
            return
        if self.k.dtype == np.float16:
            k, v = k.clip(-FLOAT16_MAX, FLOAT16_MAX), v.clip(-FLOAT16_MAX, FLOAT16_MAX)
        self.k[i, :, start:end] = k.transpose(1, 0, 2)                      # (nh, T, hd)
        self.v[i, :, start:end] = v.transpose(1, 0, 2)

    def attend(self, xp, i, q, bias):
        """Attention of q (nh, T, hd) over layer i's first S = bias.shape[-1] positions -> (nh, T, hd)."""
        S = bias.shape[-1]
        if xp is np and self.k.dtype == np.float16 and _attention is not None:
            # The kernel for any T: it never holds the (nh, T, S) scores nor a float32 copy of the span (widening
            # the span for BLAS made a 4000-token prompt through 2 int4 layers of 13B width peak at 3.46 GB in
            # Model.logits against 2.82, and 2.54 in the engine against 1.90), and since its head-dim-128 loops it
            # is also faster than widening + BLAS from 16 to 512 tokens (1.4-5x; the least at 256 tokens over 4000
            # positions, where widening used to win by 5-20%): `python tools/memory_bench.py attention`, `memory`.
            return _attention.attend_f16(np.ascontiguousarray(q), self.k[i].view(np.uint16), self.v[i].view(np.uint16),
                                         bias)
        keys, values = self.k[i, :, :S], self.v[i, :, :S]                    # (nh, S, hd)
        if keys.dtype != xp.float32:          # the kernel's specification; prefill on the GPU's float16 cache
            keys, values = keys.astype(xp.float32), values.astype(xp.float32)
        return attention(xp, q, keys, values, bias)


def cache_zeros(xp, shape, dtype):
    """Zeros that take memory only where they are written, 4 kB at a time.

    NumPy asks for transparent huge pages on large arrays, and the first write into each head's row of a cache
    then zeroes a whole 2 MB page: storing 22 tokens of one 13B-width layer took 44 ms instead of 0.8 ms, and a
    short prompt made most of a 6.7 GB 13B cache resident. An anonymous memory map is left to small pages."""
    if xp is not np:
        return xp.zeros(shape, dtype=dtype)
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=dtype, count=math.prod(shape)).reshape(shape)


def new_cache(xp, config, max_len=None, dtype=None):
    """An empty KVCache for `max_len` positions (default: the whole context) of `dtype` float32 (default) or
    float16; MemoryError saying how much the context needs when it cannot be had (a 2^20-token context of the
    13B needs 1.7 TB in float32)."""
    max_len = config.max_position if max_len is None else max_len
    if not (isinstance(max_len, numbers.Integral) and not isinstance(max_len, bool)
            and 1 <= max_len <= config.max_position):
        raise ValueError(f"new_cache: max_len must be an integer in [1, {config.max_position}] (the context), "
                         f"got {max_len!r:.60}")
    dtype = np.dtype(np.float32 if dtype is None else dtype)
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"new_cache: the cache dtype must be float16 or float32, got {dtype}")
    shape = (config.num_hidden_layers, config.num_attention_heads, int(max_len), config.head_dim)
    try:
        return KVCache(cache_zeros(xp, shape, dtype), cache_zeros(xp, shape, dtype))
    except (MemoryError, OSError):             # numpy's _ArrayMemoryError, CuPy's OutOfMemoryError, mmap's ENOMEM
        nbytes = 2 * math.prod(shape) * np.dtype(dtype).itemsize
        raise MemoryError(f"the context of {max_len} tokens needs {nbytes / 1e9:.1f} GB of KV cache "
                          f"({np.dtype(dtype).name} keys and values of {config.num_hidden_layers} layers), more "
                          "than this machine can allocate; use a shorter context or fewer new tokens") from None


def to_numpy(a):
    """Host NumPy from either array module (cupy arrays have .get())."""
    return a.get() if hasattr(a, "get") else np.asarray(a)
