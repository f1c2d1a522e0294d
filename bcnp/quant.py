"""Block quantization of linear weights: GGML Q8_0 (8 bits) and Q4_0 (4 bits) on flat arrays (SPEC section 4).

A weight w (out, in) is cut along `in` into blocks of 32; each block gets one float16 scale d and 32 codes:

    8 bits (Q8_0): d = max|x| / 127,       q = round(x / d)              int8 in [-127, 127],  x^ = q * d
    4 bits (Q4_0): d = m / -8 (m = the     q = min(15, trunc(x / d + 8.5))  0..15, two per byte,  x^ = (q - 8) * d
                   value of largest magnitude, with its sign)

stored as two flat arrays: qweight (int8 (out, in), or uint8 (out, in/2) with byte j of a block holding code j in
its low nibble and code j + 16 in its high nibble) and scales (float16 (out, in/32)). The arithmetic is GGML's to
the bit: d and 1/d are computed in float32, only the stored scale is float16, round() is half away from zero, and a
block of zeros has d = 0 (1/d taken as 0). Rows whose length is not a multiple of 32 are padded with zeros.

Two implementations of the same functions:
- `quantize`, `dequantize`, `pack_nibbles`, `unpack_nibbles` below are the specification in plain NumPy: read
  these to know what the format is.
- `quantize_fast`, `dequantize_fast` (same signatures) run the compiled kernels of csrc/quant.pyx, bit-identical
  (the tests check), multi-threaded, 10-50x faster; use them for real tensors. `QuantizedWeight` -- the quantized
  linear layer the model calls -- always uses the compiled kernels (`NumpyKernels` stands in, with one warning,
  where they are not built).

`QuantizedWeight.matmul(x)` multiplies one token (decode) with the fused kernel, which never expands W to float: it
rounds x per block of 32 to integers (`round_activation`: int16 in an 8-bit model, int8 like llama.cpp in a 4-bit
one, its 8-bit lm_head included: `QuantizedWeight.x_bits`) and sums exact integer block products (see `matvec` for
the error bound); up to BATCH_TOKENS = 8 tokens (a batched decode step) go through the batched kernel, which reads
each block once for all of them and gives each token exactly its matvec; longer prompts through the prefill GEMM,
which rounds x the same way and so keeps the same bound (BLAS on dequantized tiles, times the rounded x, where that
kernel is not built). On AVX-512 builds all three add the block products in block order into one float32 sum per
output (the AMX tile unit does a batch's integer products where the CPU has one), so a token gets the same bits at
every token count: alone, in a batch, or next to a prompt chunk.

Threads: an explicit `threads` argument, else $OMP_NUM_THREADS, else all cores.
"""
import importlib
import warnings

import numpy as np

from .errors import one_line


def _compiled(name):
    """(bcnp.<name>, None), the module setup.py builds from csrc/; or (None, why) when it cannot be imported."""
    try:
        return importlib.import_module(f"bcnp.{name}"), None
    except ImportError as e:
        return None, e


# Without the compiled modules (no C compiler or Python.h where bcnp was installed, as on a fresh GPU machine) bcnp
# still runs, on the NumPy specification (`NumpyKernels` below, bfloat16 in checkpoint.to_float32): slowly, and
# saying so once, here, for all three modules.
_quant, _quant_error = _compiled("_quant")
_dtypes_error = _compiled("_dtypes")[1]
_attention, _attention_error = _compiled("_attention")      # a float16 KV cache's attention (bcnp.cache)
_missing = {f"bcnp.{name}": e for name, e in (("_quant", _quant_error), ("_dtypes", _dtypes_error),
                                               ("_attention", _attention_error)) if e is not None}
if _missing:
    warnings.warn(one_line(f"{' and '.join(_missing)} (compiled from csrc/) could not be loaded "
                           f"({next(iter(_missing.values()))}); running the NumPy specification instead, many times "
                           "slower: build them with `python setup.py build_ext --inplace` (needs a C compiler and "
                           "Python.h) or `pip install -e .`"), RuntimeWarning, stacklevel=2)

from .layout import (BITS, BLOCK_SIZE as BLOCK, activation_bits, is_linear, padded_width,  # noqa: F401 (re-exported)
                     quantized_bits)


# --- the specification, in NumPy ------------------------------------------------------------------------------

def _check_bits(bits):
    if bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")


def _weight_blocks(w, name):
    """w as float32 (out, in_pad), zero-padded to whole blocks, checked finite."""
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[1] == 0 or not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"{name}: expected a 2-D float array (out_features, in_features), "
                         f"got {w.dtype} with shape {w.shape}")
    w = w.astype(np.float32, copy=False)
    bad = ~np.isfinite(w)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"{name}: non-finite value {w[r, c]} at [{r}, {c}]; cannot quantize")
    pad = padded_width(w.shape[1]) - w.shape[1]
    if pad:
        w = np.pad(w, ((0, 0), (0, pad)))
    return w


def _inverse(d):
    """1/d per block, 0 where d is 0 -- or where 1/d overflows (d < 2^-128; its float16 scale is 0 anyway and GGML
    leaves the case undefined: such a block is stored like a zero block)."""
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.float32(1) / d
    return np.where(np.isfinite(inv), inv, np.float32(0))


def _round_half_away(v):
    """C's roundf: truncate, then step away from zero when the dropped fraction is at least one half."""
    t = np.trunc(v)
    return t + np.copysign(np.abs(v - t) >= np.float32(0.5), v, dtype=np.float32)


def _float16_scales(d, name, bits):
    with np.errstate(over="ignore"):
        d16 = d.astype(np.float16)
    if np.isinf(d16).any():
        r, b = np.argwhere(np.isinf(d16))[0]
        raise ValueError(f"{name}: block [{r}, {BLOCK * b}:{BLOCK * (b + 1)}] has a scale {float(d[r, b])} too large "
                         f"for float16 at {bits} bits (max |w| < {65504 * (127 if bits == 8 else 8)})")
    return d16


def quantize(w, bits, name="weight"):
    """w float (out, in) -> (qweight, scales): int8 (out, in_pad) for 8 bits, packed uint8 (out, in_pad/2) for 4;
    scales float16 (out, in_pad/32). The readable reference; `quantize_fast` is the same, compiled."""
    _check_bits(bits)
    w = _weight_blocks(w, name)
    blocks = w.reshape(w.shape[0], -1, BLOCK)                     # (out, n_blocks, 32)
    if bits == 8:
        d = np.abs(blocks).max(axis=-1) / np.float32(127)         # (out, n_blocks) float32
        q = _round_half_away(blocks * _inverse(d)[..., None]).astype(np.int8)
        qweight = q.reshape(w.shape)
    else:
        first_largest = np.abs(blocks).argmax(axis=-1)[..., None]
        m = np.take_along_axis(blocks, first_largest, axis=-1)[..., 0]
        d = m / np.float32(-8)
        x = blocks * _inverse(d)[..., None] + np.float32(8.5)      # two float32 roundings, as GGML (no fma)
        q = np.minimum(15, np.trunc(x)).astype(np.uint8)
        qweight = pack_nibbles(q.reshape(w.shape))
    return qweight, _float16_scales(d, name, bits)


def dequantize(qweight, scales, bits, in_features=None):
    """(qweight, scales) -> float32 (out, in): code * float32(scale); cut to in_features when given."""
    _check_bits(bits)
    q = unpack_nibbles(qweight).astype(np.int8) - np.int8(8) if bits == 4 else np.asarray(qweight)
    scales = np.asarray(scales)
    if q.ndim != 2 or q.shape[1] % BLOCK or scales.shape != (q.shape[0], q.shape[1] // BLOCK):
        raise ValueError(f"dequantize: {bits}-bit qweight {np.shape(qweight)} and scales {scales.shape} "
                         "do not fit together (one scale per 32 weights)")
    blocks = q.reshape(q.shape[0], -1, BLOCK).astype(np.float32)
    w = (blocks * scales.astype(np.float32)[..., None]).reshape(q.shape)
    return w if in_features is None else w[:, :in_features]


# The fused kernels round x per block of 32 to x_bits-bit integers before the block products
# (csrc/quant_kernels.h; layout.activation_bits says which, by the model's bits). By the bits of x:
ACTIVATION_LIMIT = {16: 32767, 8: 127}


def round_activation(x, x_bits):
    """x float32 (..., n), n % 32 == 0 -> (xq (..., n) integers, dx float32 (..., n/32)) with dx = max|x_b| / L and
    xq = round(x / dx) (half away from zero, float32 division) in [-L, L], L = ACTIVATION_LIMIT[x_bits] (x_bits 16
    or 8): dx * xq is the x that the fused kernels multiply by a weight of that `x_bits`. A block of zeros has dx = 0
    and xq = 0; a block holding inf or nan has dx = nan."""
    if x_bits not in ACTIVATION_LIMIT or isinstance(x_bits, bool):
        raise ValueError(f"round_activation: x_bits must be 16 or 8, got {x_bits!r}")
    limit = ACTIVATION_LIMIT[x_bits]
    x = np.asarray(x, np.float32)
    if x.ndim == 0 or x.shape[-1] % BLOCK:
        raise ValueError(f"round_activation: x has shape {x.shape}, expected rows of a multiple of {BLOCK} elements")
    blocks = x.reshape(*x.shape[:-1], -1, BLOCK)
    amax = np.abs(blocks).max(axis=-1)
    dx = np.where(np.isfinite(amax), amax / np.float32(limit), np.float32(np.nan)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = blocks / dx[..., None]
    xq = np.where(dx[..., None] > 0, np.clip(_round_half_away(v), -limit, limit), np.float32(0))
    return xq.reshape(x.shape), dx


def rounded_activation(x, x_bits):
    """dx * xq of `round_activation`, float32 (..., n): the x the kernels multiply, to one float32 rounding of each
    product."""
    xq, dx = round_activation(x, x_bits)
    x = xq.reshape(*xq.shape[:-1], -1, BLOCK) * dx[..., None]             # float32 times float32
    return x.reshape(xq.shape)


def pack_nibbles(q):
    """codes (..., 32k) uint8 in 0..15 -> (..., 16k): byte j of a block = code j | code j+16 << 4."""
    q = np.asarray(q)
    if q.shape[-1] % BLOCK or (q.size and (q.min() < 0 or q.max() > 15)):
        raise ValueError(f"pack_nibbles: expected codes 0..15 in rows of a multiple of 32, got shape {q.shape}")
    blocks = q.astype(np.uint8).reshape(*q.shape[:-1], -1, 2, BLOCK // 2)
    return (blocks[..., 0, :] | (blocks[..., 1, :] << 4)).reshape(*q.shape[:-1], -1)


def unpack_nibbles(packed):
    """The inverse of pack_nibbles: (..., 16k) -> codes (..., 32k)."""
    packed = np.asarray(packed, dtype=np.uint8)
    blocks = packed.reshape(*packed.shape[:-1], -1, 1, BLOCK // 2)
    return np.concatenate([blocks & 0x0F, blocks >> 4], axis=-2).reshape(*packed.shape[:-1], -1)


class NumpyKernels:
    """What bcnp.quant calls in the compiled bcnp._quant, answered by the specification above when the module is
    not built (same arguments, same results; scales as float16 bits). The one difference: `matvec_*` and
    `matmul_*` multiply the dequantized weight by the rounded x in float32 (NumPy's order of additions), where the
    compiled kernels add exact integer block products."""
    SIMD = "numpy"

    @staticmethod
    def resolve_threads(threads=0):
        return 1

    @staticmethod
    def release_threads():
        return False

    @staticmethod
    def quantize_q8_0(w, name="weight", threads=0):
        qweight, scales = quantize(w, 8, name)
        return qweight, scales.view(np.uint16)

    @staticmethod
    def quantize_q4_0(w, name="weight", threads=0):
        qweight, scales = quantize(w, 4, name)
        return qweight, scales.view(np.uint16)

    @staticmethod
    def dequantize_q8_0(q, d, out=None, threads=0):
        return _into(out, dequantize(q, np.asarray(d).view(np.float16), 8))

    @staticmethod
    def dequantize_q4_0(q, d, out=None, threads=0):
        return _into(out, dequantize(q, np.asarray(d).view(np.float16), 4))

    @staticmethod
    def matvec_q8_0(q, d, x, out=None, threads=0, x_bits=16):
        return _into(out, NumpyKernels.dequantize_q8_0(q, d) @ rounded_activation(x, x_bits))

    @staticmethod
    def matvec_q4_0(q, d, x, out=None, threads=0):
        return _into(out, NumpyKernels.dequantize_q4_0(q, d) @ rounded_activation(x, 8))

    @staticmethod
    def matmul_q8_0(q, d, x, out=None, threads=0, x_bits=16):
        return _into(out, rounded_activation(x, x_bits) @ NumpyKernels.dequantize_q8_0(q, d).T)

    @staticmethod
    def matmul_q4_0(q, d, x, out=None, threads=0):
        return _into(out, rounded_activation(x, 8) @ NumpyKernels.dequantize_q4_0(q, d).T)

    GEMM = False                                    # prefill: dequantized tiles and BLAS

    pack_nibbles = staticmethod(pack_nibbles)
    unpack_nibbles = staticmethod(unpack_nibbles)

    @staticmethod
    def f32_to_f16_bits(x):
        return np.asarray(x, np.float32).astype(np.float16).view(np.uint16)

    @staticmethod
    def f16_bits_to_f32(h):
        return np.asarray(h, np.uint16).view(np.float16).astype(np.float32)


def _into(out, values):
    if out is None:
        return values
    out[...] = values
    return out


if _quant is None:
    _quant = NumpyKernels


# --- the same, compiled ------------------------------------------------------------------------------------------

def _c_contiguous(a, dtype):
    a = np.asarray(a)
    return a if a.dtype == dtype and a.flags.c_contiguous else np.ascontiguousarray(a, dtype=dtype)


def quantize_fast(w, bits, name="weight", threads=None):
    """`quantize`, compiled and multi-threaded; bit-identical."""
    _check_bits(bits)
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[1] == 0 or not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"{name}: expected a 2-D float array (out_features, in_features), "
                         f"got {w.dtype} with shape {w.shape}")
    w = _c_contiguous(w, np.float32)
    pad = padded_width(w.shape[1]) - w.shape[1]
    if pad:
        w = np.pad(w, ((0, 0), (0, pad)))
    kernel = _quant.quantize_q8_0 if bits == 8 else _quant.quantize_q4_0
    qweight, scales = kernel(w, name, threads or 0)
    return qweight, scales.view(np.float16)


def dequantize_fast(qweight, scales, bits, in_features=None, threads=None, out=None):
    """`dequantize`, compiled and multi-threaded; bit-identical. `out`: a float32 (out, in_pad) to fill."""
    _check_bits(bits)
    kernel = _quant.dequantize_q8_0 if bits == 8 else _quant.dequantize_q4_0
    q = _c_contiguous(qweight, np.int8 if bits == 8 else np.uint8)
    w = kernel(q, _c_contiguous(scales, np.float16).view(np.uint16), out, threads or 0)
    return w if in_features is None else w[:, :in_features]


# --- the quantized linear layer --------------------------------------------------------------------------------

class QuantizedWeight:
    """A quantized linear weight W (out_features, in_features): `qweight`, `scales` as in `quantize` (either may be
    a read-only np.memmap of a converted checkpoint), padded to whole blocks along `in`; `x_bits`, the integers its
    kernels round x to (16 or 8; default `activation_bits(bits)`, 4-bit weights only 8): a property of the model,
    not of the stored blocks, so an int4 model's 8-bit lm_head has x_bits 8.

    `matmul(x)` is x @ W.T, always straight from the blocks: one token through the fused matvec, 2 to BATCH_TOKENS
    tokens (a batched decode step) through the batched kernel, bit-identical per token to the matvec, and longer
    prompts through `prefill` (the int16 VNNI GEMM or the AMX kernel; dequantized tiles and BLAS where neither is
    built). On AVX-512 builds the prompt's rows are the matvec's bits too (`_quant.GROUPS`)."""

    TILE_BYTES = 64 * 2**20                 # float32 scratch per tile of dequantized rows

    def __init__(self, qweight, scales, bits, in_features=None, x_bits=None):
        _check_bits(bits)
        x_bits = activation_bits(bits) if x_bits is None else x_bits
        if x_bits not in ((16, 8) if bits == 8 else (8,)) or isinstance(x_bits, bool):
            raise ValueError(f"QuantizedWeight: x_bits must be {'16 or 8' if bits == 8 else '8'} for {bits}-bit "
                             f"weights, got {x_bits!r}")
        dtype = np.int8 if bits == 8 else np.uint8
        qweight, scales = np.asarray(qweight), np.asarray(scales)
        if qweight.dtype != dtype or qweight.ndim != 2:
            raise ValueError(f"QuantizedWeight: {bits}-bit qweight must be 2-D {np.dtype(dtype)}, "
                             f"got {qweight.dtype} with shape {qweight.shape}")
        in_pad = qweight.shape[1] * (1 if bits == 8 else 2)
        if in_pad % BLOCK or scales.dtype != np.float16 or scales.shape != (qweight.shape[0], in_pad // BLOCK):
            raise ValueError(f"QuantizedWeight: scales must be float16 {(qweight.shape[0], in_pad // BLOCK)} for "
                             f"qweight {qweight.shape} at {bits} bits, got {scales.dtype} {scales.shape}")
        in_features = in_pad if in_features is None else int(in_features)
        if padded_width(in_features) != in_pad or in_features <= 0:
            raise ValueError(f"QuantizedWeight: in_features {in_features} does not pad to the stored width {in_pad}")
        self.qweight = _c_contiguous(qweight, dtype)
        self.scales = _c_contiguous(scales, np.float16)
        self.bits, self.x_bits = bits, x_bits
        self.out_features, self.in_features, self.in_padded = qweight.shape[0], in_features, in_pad

    @classmethod
    def from_float(cls, w, bits, name="weight", threads=None, x_bits=None):
        w = np.asarray(w)
        return cls(*quantize_fast(w, bits, name, threads), bits, in_features=w.shape[-1], x_bits=x_bits)

    def with_x_bits(self, x_bits):
        """The same blocks (no copy), their x rounded to x_bits-bit integers."""
        if x_bits == self.x_bits:
            return self
        return QuantizedWeight(self.qweight, self.scales, self.bits, self.in_features, x_bits)

    def _x_kwargs(self):
        """The kernels' keyword for the rounding of x: Q8_0's take x_bits, Q4_0's always round to int8."""
        return {"x_bits": self.x_bits} if self.bits == 8 else {}

    @property
    def shape(self):
        return (self.out_features, self.in_features)

    @property
    def nbytes(self):
        return self.qweight.nbytes + self.scales.nbytes

    def __repr__(self):
        return f"QuantizedWeight(shape={self.shape}, bits={self.bits}, x_bits={self.x_bits}, nbytes={self.nbytes})"

    def dequantize(self, threads=None):
        """float32 (out_features, in_features)."""
        return dequantize_fast(self.qweight, self.scales, self.bits, self.in_features, threads)

    def _padded(self, x):
        """x (..., in_features) as contiguous float32 (..., in_padded), zeros in the padding."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedWeight {self.shape}: input has {x.shape[-1]} features, "
                             f"expected {self.in_features}")
        if self.in_padded != self.in_features:
            x = np.concatenate([x, np.zeros((*x.shape[:-1], self.in_padded - self.in_features), np.float32)], -1)
        return np.ascontiguousarray(x)

    def matvec(self, x, threads=None):
        """y = W x for one token x (in_features,) -> (out_features,), fused: W is never expanded to float.
        x is rounded per block of 32 by `round_activation` (dx = max|x_b| / L, L = 32767 for x_bits 16 and 127 for
        x_bits 8; error <= dx (1/2 + (L + 1) 2^-24) per element: 2^-16, or 2^-8, of the block's largest |x|)
        and every block contributes its exact integer dot product times d_w * dx, so
        |y - dequantize() @ x| <= sum_b |d_w,b| dx_b sum_i |q_i| (1/2 + (L + 1) 2^-24 + (n_blocks + 4) L 2^-24)
        with q the weight codes: the rounding of x, then the float32 rounding of the block products and their sum.
        With int16 x that is the size of float32 summation error at Baichuan widths (n_blocks = 160 or 428); with
        int8 x a sixteenth of 4-bit weights' own rounding, and about as much as 8-bit weights' own."""
        x = self._padded(x)
        if x.ndim != 1:
            raise ValueError(f"QuantizedWeight.matvec: x must be 1-D, got shape {x.shape}")
        kernel = _quant.matvec_q8_0 if self.bits == 8 else _quant.matvec_q4_0
        return kernel(self.qweight, self.scales.view(np.uint16), x, None, threads or 0, **self._x_kwargs())

    def matmul(self, x, threads=None):
        """x (T, in_features) -> x @ W.T (T, out_features); x (in_features,) -> (out_features,).
        T = 1 is `matvec`; up to BATCH_TOKENS tokens go through the batched kernel, which reads W once for all of
        them and gives every token exactly its `matvec` (the same rounding of x, the same sums in the same order),
        so a sequence's result does not depend on the others in its batch; longer prompts go through `prefill`."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 1:
            return self.matvec(x, threads)
        if x.ndim != 2:
            raise ValueError(f"QuantizedWeight.matmul: x must be 1-D or 2-D, got shape {x.shape}")
        if x.shape[0] == 1:
            return self.matvec(x[0], threads)[None, :]
        x = self._padded(x)
        if x.shape[0] <= BATCH_TOKENS:
            kernel = _quant.matmul_q8_0 if self.bits == 8 else _quant.matmul_q4_0
            return kernel(self.qweight, self.scales.view(np.uint16), x, None, threads or 0, **self._x_kwargs())
        return prefill(self, x, threads)


# Tokens the batched decode kernel takes in one call: the engine's default widest decode step (max_batch 8). On
# AVX-512 builds a batch from 3 tokens on (without AMX: int8 from 2, int4 from 3) goes through the kernels
# `prefill` uses, with the same sums, so the line matters only elsewhere, where it keeps a decode step's sums the
# matvec's.
BATCH_TOKENS = 8


def prefill(weight, x, threads=None):
    """x (T, in_padded) float32 @ W.T for a long prompt, from the blocks: x rounded per token and block of 32
    exactly as `matvec` rounds it, exact integer block sums, one float32 sum over the blocks per output (on
    AVX-512 builds the matvec's own sums, bit for bit): the error bound of `matvec` holds
    (tests/test_quant_batch.py checks it).
    Builds with neither the AVX-512 VNNI nor the AVX2 kernel multiply dequantized tiles by the rounded x with BLAS
    instead.
    Measured on 2 shared Sapphire Rapids cores (`python tools/bench.py kernels --quick --threads 2`, the five linears
    of a 13B layer): at 16, 128 and 512 tokens the GEMM reached 1.4-6x the GFLOP/s of a float32 BLAS GEMM of the
    same layer in the same run (dequantize + BLAS is slower than that GEMM), both bit widths, int8 within 1.15x of
    int4; so BLAS is kept only as the fallback of builds without the kernel. The AVX2 kernel (a build without
    AVX-512, tests/test_kernels_avx2.py) measured 1.5-2.6x faster than dequantize + OpenBLAS's AVX2 sgemm."""
    if not _quant.GEMM:
        return dequantized_matmul(weight, x)
    kernel = _quant.prefill_q8_0 if weight.bits == 8 else _quant.prefill_q4_0
    return kernel(weight.qweight, weight.scales.view(np.uint16), x, None, threads or 0, **weight._x_kwargs())


def dequantized_matmul(weight, x):
    """x (T, in_padded) float32, rounded as `matvec` rounds it, @ W.T by BLAS on float32 tiles of W's rows
    dequantized in turn: exact up to the float32 rounding of the GEMM."""
    x = rounded_activation(x, weight.x_bits)
    y = np.empty((x.shape[0], weight.out_features), np.float32)
    rows = max(1, min(weight.out_features, weight.TILE_BYTES // (4 * weight.in_padded)))
    scratch = np.empty((rows, weight.in_padded), np.float32)
    kernel = _quant.dequantize_q8_0 if weight.bits == 8 else _quant.dequantize_q4_0
    scales = weight.scales.view(np.uint16)
    for r in range(0, weight.out_features, rows):
        n = min(rows, weight.out_features - r)
        # One thread: BLAS brings its own thread pool, and OpenMP threads idling (spinning) between tiles
        # take the cores from it (measured on 2 cores: a 128-token 13B layer 0.61 s this way, 0.80 s with 2).
        w = kernel(weight.qweight[r:r + n], scales[r:r + n], scratch[:n], 1)
        y[:, r:r + n] = x @ w.T
    return y
