"""The measuring pieces tools/bench.py and tools/blas_stall.py share: timers, the bandwidth and BLAS probes, random
weights, and models of Baichuan-13B's widths (or tiny ones for --smoke).

Import it after the thread variables are set: numpy starts OpenBLAS (and reads its environment) when it loads.
"""
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bcnp  # noqa: E402,F401  (first: bcnp sets OpenBLAS's environment before numpy loads it)
import numpy as np  # noqa: E402

from bcnp import _quant  # noqa: E402
from bcnp.config import BAICHUAN_13B  # noqa: E402
from bcnp import Model  # noqa: E402
from bcnp.layout import EMBEDDING  # noqa: E402
from bcnp.weights import quantized, with_rope_table  # noqa: E402

LAYERS_13B = 40
KINDS = {"float32": None, "int8": 8, "int4": 4}


def best_time(f, repeats):
    """The fastest of `repeats` runs after one warm-up: the least disturbed by anything else on the machine."""
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


class Bandwidth:
    """Memory read bandwidth, probed next to every measurement: on a shared (virtual) machine it moves by tens of
    percent from minute to minute, so each time is compared with a probe taken just before it. The probe is
    bcnp._quant.stream_read: every thread sums its own contiguous slice of a buffer well beyond the last-level
    cache (the access pattern of the decode matvec)."""

    def __init__(self, threads, mib=512):
        self.buf = np.ones(mib << 17, np.uint64)
        self.threads = threads
        self.seen = []

    def probe(self):
        t = time.perf_counter()
        _quant.stream_read(self.buf, self.threads)
        gbs = self.buf.nbytes / (time.perf_counter() - t) / 1e9
        self.seen.append(gbs)
        return gbs

    def measure(self, f, nbytes, repeats):
        """(best time of f, median over runs of (nbytes / time) / (the probe just before it))."""
        f()
        times, ratios = [], []
        for _ in range(repeats):
            time.sleep(0.15)        # let OpenBLAS's idle threads stop spinning before probing (see bcnp/__init__)
            bw = max(self.probe(), self.probe())
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
            ratios.append(nbytes / times[-1] / 1e9 / bw)
        return min(times), float(np.median(ratios))


def blas_gflops(m, k, n, repeats, pool):
    """The float32 GEMM ceiling: (m, k) @ (k, n) by numpy's BLAS, GFLOP/s of the best of `repeats`."""
    a, b = pool((m, k)), pool((k, n))
    out = np.empty((m, n), np.float32)
    return 2 * m * k * n / best_time(lambda: np.matmul(a, b, out=out), repeats) / 1e9


class RandomPool:
    """Tensors filled from one pool of random normals at rotating offsets: memcpy speed instead of an RNG's."""

    def __init__(self, size=1 << 24, seed=0):
        self.pool = np.random.default_rng(seed).standard_normal(size, dtype=np.float32) * np.float32(0.02)
        self.offset = 0

    def __call__(self, shape, dtype=np.float32):
        out = np.empty(shape, dtype)
        flat, n = out.reshape(-1), out.size
        i = 0
        while i < n:
            start = self.offset % len(self.pool)
            k = min(n - i, len(self.pool) - start)
            flat[i:i + k] = self.pool[start:start + k]
            i += k
            self.offset += k + 7919                       # a prime stride, so tensors differ
        return out


def model_config(layers, smoke=False, position_embedding="alibi"):
    """Baichuan-13B's widths with `layers` layers (--smoke: tiny widths, the same kinds of shapes)."""
    config = BAICHUAN_13B
    if smoke:
        config = dataclasses.replace(config, vocab_size=512, hidden_size=128, intermediate_size=344,
                                     num_attention_heads=4)
    return dataclasses.replace(config, num_hidden_layers=layers, position_embedding=position_embedding)


def random_model(config, pool, bits=None):
    """A Model of random weights: float32, or quantized by Model.quantize's pass (bcnp.weights.quantized: `bits` 8
    or 4, the linears to `bits`, lm_head to 8, the embedding to float16), each tensor quantized as it is drawn."""
    arrays = ((name, np.ones(shape, np.float32) if len(shape) == 1 else pool(shape))
              for name, shape in config.weight_shapes().items())
    return Model(config, with_rope_table(config, dict(quantized(arrays, bits) if bits else arrays)))


def weight_bytes_per_token(model):
    """Bytes of weights one decode step reads: every linear and lm_head whole, one row of the embedding."""
    return sum(w.nbytes // w.shape[0] if name == EMBEDDING else w.nbytes for name, w in model.w.items())


def filled_cache(model, positions, pool):
    """A cache of `positions + 1` places whose first `positions` hold random keys and values: decode at a long
    context costs the same whatever the cached values are, and filling beats a prefill of that length by minutes."""
    cache = model.new_cache(positions + 1)
    for layer in range(model.config.num_hidden_layers):
        shape = cache.k[layer, :, :positions].shape
        cache.k[layer, :, :positions] = pool(shape)
        cache.v[layer, :, :positions] = pool(shape)
    cache.length = positions
    return cache


def cache_bytes_per_token(cache, positions):
    """Bytes of keys and values one decode step reads at `positions` cached positions (every layer, every head)."""
    layers, heads, _, head_dim = cache.k.shape
    return 2 * layers * heads * positions * head_dim * cache.k.dtype.itemsize
