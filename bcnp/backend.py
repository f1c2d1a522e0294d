"""The GPU: the forward pass of bcnp.model run by CuPy, with CUDA kernels for the linear layers and decode attention.

    model = Model.from_pretrained(path).quantize(8).cuda()     # = to_device(model)

`to_device` copies the weights to the GPU one tensor at a time: float weights as float16 (the norms stay
float32), quantized ones as they are, and returns a `DeviceModel` whose array module is `cupy`, so `bcnp.model`
runs the same lines as on the CPU; its KV cache is float16 on the GPU. Activations and every sum stay float32.

Each linear weight becomes a `DeviceQuantizedWeight` (8 or 4 bits, or 16 for float16 values): one token
(decode) multiplies in a matvec kernel that reads the weights once, straight from their compact form; several
tokens (prefill) expand the weights into a float16 scratch and multiply with cuBLAS (float32 accumulation).
For one token the cache (`DeviceKVCache`) attends in a kernel that reads the float16 keys and values as stored,
`decode_layer` runs a layer in 8 kernels (each norm one kernel, the residual adds and the MLP's activation inside
the matvecs), and whole steps are replayed from CUDA graphs (`DecodeGraphs`): launched one by one from Python,
the kernels would cost more time than the GPU needs to read the layer's weights.
`to_device(model, dtype="float32")` keeps float32 weights, float32 prefill and a float32 cache instead: the same
numbers as the CPU, for the golden tests.

The kernels live in bcnp/cuda/quant_kernels.cu. Each has a NumPy twin below, written against an array module
`xp`, doing the same float32 operations in the same order, subnormals flushed to zero as CuPy's -ftz=true makes
the kernels do; the tests check the twins against bcnp.quant and
bcnp.model on the CPU and the kernels against the twins on a GPU. `to_device(model, xp=module)` with any module
other than CuPy runs the twins instead of the kernels, and each decode step op by op instead of from a graph:
the tests run the whole forward pass that way on a module that refuses implicit conversions to NumPy, as CuPy
does (tests/strict_xp.py), so a stray `np.` call fails without a GPU.
"""
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np

from .model import CheckpointWeights, KVCache, Model, linear, new_cache, rope, to_numpy, transformer
from .quant import BLOCK, QuantizedWeight, is_linear, padded_width

KERNEL_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda", "quant_kernels.cu")
KERNEL_NAMES = ("matvec_q8_0", "matvec_q4_0", "matvec_f16", "matvec_q8_0_add", "matvec_q4_0_add", "matvec_f16_add",
                "matvec_q8_0_swiglu", "matvec_q4_0_swiglu", "matvec_f16_swiglu",
                "dequantize_q8_0_f32", "dequantize_q8_0_f16", "dequantize_q4_0_f32", "dequantize_q4_0_f16",
                "attention_decode_f16", "attention_decode_f32", "attention_combine",
                "rms_norm_f32", "silu_mul_f32", "kv_store_f16", "kv_store_f32")
# cupy.RawModule compiles with NVRTC: these options, then what CuPy appends (cupy/cuda/compiler.py, CuPy 13-14:
# _compile_with_cache_cuda adds '-ftz=true', _compile_using_nvrtc_no_warning '-arch=sm_XY' of the device and
# '--device-as-default-execution-space'). NVRTC takes the last -ftz it is given, so the kernels always flush
# subnormals to zero, and the NumPy twins below do too.
NVRTC_OPTIONS = ("-std=c++17",)
CUPY_NVRTC_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")        # and -arch=sm_XY
WARP = 32
MATVEC_THREADS, MATVEC_ROWS_PER_BLOCK = 64, 8      # WARPS * 32 threads and WARPS * ROWS rows in quant_kernels.cu
DEQUANTIZE_THREADS = 256
ATTENTION_WARPS, MAX_DIMS_PER_LANE = 8, 8          # as #defined in quant_kernels.cu
ATTENTION_CHUNK = WARP * ATTENTION_WARPS            # keys per block of attention_decode, one per thread
NORM_THREADS = 256                                  # as #defined in quant_kernels.cu
ELEMENTWISE_THREADS = 256


class BackendError(RuntimeError):
    pass


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def get_cupy():
    """The cupy module, once it is known to see a GPU; else one clear BackendError."""
    try:
        import cupy
    except ImportError as e:
        raise BackendError("CUDA requested but CuPy is not installed: pip install bcnp[cuda12] "
                           f"(or bcnp[cuda13] for CUDA 13; import cupy: {first_line(e)})") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:                  # CUDARuntimeError: no driver, no device, driver too old
        raise BackendError(f"CUDA requested but no CUDA device found ({first_line(e)})") from None
    if count < 1:
        raise BackendError("CUDA requested but no CUDA device found")
    return cupy


def is_cupy(xp):
    return getattr(xp, "__name__", None) == "cupy"


_kernels = {}                               # device id -> {name: cupy.RawKernel}


def cuda_kernels(cupy):
    """The kernels of quant_kernels.cu, compiled once per device (CuPy also caches the binary on disk)."""
    device = cupy.cuda.Device().id
    if device not in _kernels:
        with open(KERNEL_SOURCE, encoding="utf-8") as f:
            module = cupy.RawModule(code=f.read(), options=NVRTC_OPTIONS)
        try:
            _kernels[device] = {name: module.get_function(name) for name in KERNEL_NAMES}   # compiles here
        except Exception as e:          # NVRTC missing (pip install nvidia-cuda-nvrtc-cu12) or a compile error
            raise BackendError(f"{KERNEL_SOURCE}: CuPy could not compile the CUDA kernels: {first_line(e)}") from e
    return _kernels[device]


# --- the NumPy twins of the kernels ------------------------------------------------------------------------------
#
# A matvec kernel gives each lane of a warp one word (4 values; 8 for Q4_0) per step, adds the word's products
# in order, scales the sum by the block's d and adds it to the lane's running sum; the warp then adds its 32 lanes
# by halving. The twins lay the same words out as (rows, steps, 32 lanes, values) and do exactly that.
#
# CuPy compiles every kernel with -ftz=true (CUPY_NVRTC_OPTIONS): each float32 add, multiply, divide and square
# root of quant_kernels.cu flushes subnormal operands and results to zero (add.rn.ftz.f32 etc. in the PTX; a test
# compiles it and checks). NumPy keeps subnormals, so the twins `flush` the float32 inputs they read and the
# result of each such operation: then they equal the kernels bit for bit below 2^-126 too. Values converted from
# float16 (weights, scales, a float16 cache) and integer codes times a float16 scale are never float32 subnormals.

FLOAT32_TINY = np.float32(2.0 ** -126)              # float32's smallest normal number


def flush(a):
    """a with its float32 subnormals replaced by zero of the same sign, as -ftz=true does (NaN stays NaN)."""
    return a * (abs(a) >= FLOAT32_TINY)


def pad_columns(xp, a, width):
    """a (..., n) with zero columns appended up to `width`."""
    if a.shape[-1] == width:
        return a
    return xp.concatenate([a, xp.zeros(a.shape[:-1] + (width - a.shape[-1],), dtype=a.dtype)], axis=-1)


def word_sums(values, x):
    """((v0 x0 + v1 x1) + v2 x2) + ..., over the last axis, in the kernel's order (no pairwise summation)."""
    products = flush(values * x)
    s = 0.0 + products[..., 0]
    for k in range(1, products.shape[-1]):
        s = flush(s + products[..., k])
    return s


def warp_sums(xp, terms):
    """terms (rows, steps, 32): each lane's running sum over the steps, then the warp's halving sum (lane 0)."""
    acc = xp.zeros((terms.shape[0], WARP), dtype=xp.float32)
    for step in range(terms.shape[1]):
        acc = flush(acc + terms[:, step])
    for offset in (16, 8, 4, 2, 1):
        acc = flush(acc + acc[:, [lane ^ offset for lane in range(WARP)]])
    return acc[:, 0]


def block_sums(xp, values, threads):
    """values (rows, m) -> (rows,): a block's sum: thread t adds values t, t + threads, ... in order, each warp
    adds its lanes by halving, then warps 0, 1, ... are added in order."""
    rows, m = values.shape
    rounds = -(-m // threads)
    padded = pad_columns(xp, values, rounds * threads).reshape(rows, rounds, threads)
    by_thread = xp.zeros((rows, threads), dtype=xp.float32)
    for r in range(rounds):
        by_thread = flush(by_thread + padded[:, r])
    by_warp = warp_sums(xp, by_thread.reshape(rows * (threads // WARP), 1, WARP)).reshape(rows, threads // WARP)
    total = by_warp[:, 0]
    for w in range(1, threads // WARP):
        total = flush(total + by_warp[:, w])
    return total


def matvec_q8_0(xp, qweight, scales, x):
    """Twin of the kernel matvec_q8_0: W x for qweight int8 (R, n_pad), scales float16 (R, n_pad/32), x float32
    (n_pad,) -> float32 (R,). A step covers 32 words of 4 values; a block is 8 words."""
    rows, n_pad = qweight.shape
    steps = -(-n_pad // (4 * WARP))
    width = 4 * WARP * steps
    values = pad_columns(xp, qweight.astype(xp.float32), width).reshape(rows, steps, WARP, 4)
    xs = flush(pad_columns(xp, x, width).reshape(steps, WARP, 4))
    d = xp.repeat(pad_columns(xp, scales.astype(xp.float32), width // BLOCK), 8, axis=1).reshape(rows, steps, WARP)
    return warp_sums(xp, flush(word_sums(values, xs) * d))


def matvec_q4_0(xp, qweight, scales, x):
    """Twin of the kernel matvec_q4_0: W x for qweight uint8 (R, n_pad/2) packed as SPEC §4, scales float16
    (R, n_pad/32), x float32 (n_pad,) -> float32 (R,). Word m of a block (its bytes 4m..4m+3) carries values
    4m..4m+3 (low nibbles) and 16+4m..16+4m+3 (high nibbles); a step covers 32 words = 8 blocks."""
    rows, n_pad = qweight.shape[0], 2 * qweight.shape[1]
    steps = -(-n_pad // (8 * WARP))
    blocks = 8 * steps
    packed = pad_columns(xp, qweight, 16 * blocks).reshape(rows, steps, 8, 4, 4)      # (.., block, word, byte)
    codes = xp.concatenate([packed & 15, packed >> 4], axis=-1)                       # 4 low, then 4 high
    values = (codes.astype(xp.float32) - 8.0).reshape(rows, steps, WARP, 8)
    xs = pad_columns(xp, x, BLOCK * blocks).reshape(steps, 8, 2, 4, 4)                # (.., block, half, word, k)
    xs = flush(xs.transpose(0, 1, 3, 2, 4).reshape(steps, WARP, 8))
    d = xp.repeat(pad_columns(xp, scales.astype(xp.float32), blocks), 4, axis=1).reshape(rows, steps, WARP)
    return warp_sums(xp, flush(word_sums(values, xs) * d))


def matvec_f16(xp, weight, x):
    """Twin of the kernel matvec_f16: W x for weight float16 (R, n_pad), x float32 (n_pad,) -> float32 (R,)."""
    rows, n_pad = weight.shape
    steps = -(-n_pad // (4 * WARP))
    width = 4 * WARP * steps
    values = pad_columns(xp, weight.astype(xp.float32), width).reshape(rows, steps, WARP, 4)
    return warp_sums(xp, word_sums(values, flush(pad_columns(xp, x, width).reshape(steps, WARP, 4))))


def add_residual(residual, y):
    """Twin of the _add kernels' ending: residual + y, one float32 add."""
    return flush(flush(residual) + y)


def dequantize_q8_0(xp, qweight, scales, dtype):
    """Twin of the kernels dequantize_q8_0_f32 / _f16: (R, n_pad) of q * d (exact in float32), as `dtype`."""
    rows, n_pad = qweight.shape
    w = qweight.astype(xp.float32).reshape(rows, -1, BLOCK) * scales.astype(xp.float32)[..., None]
    return w.reshape(rows, n_pad).astype(dtype)


def dequantize_q4_0(xp, qweight, scales, dtype):
    """Twin of the kernels dequantize_q4_0_f32 / _f16: (R, n_pad) of (code - 8) * d, as `dtype`."""
    rows = qweight.shape[0]
    packed = qweight.reshape(rows, -1, 1, BLOCK // 2)
    codes = xp.concatenate([packed & 15, packed >> 4], axis=2).astype(xp.float32) - 8.0      # (R, blocks, 2, 16)
    w = codes * scales.astype(xp.float32)[..., None, None]
    return w.reshape(rows, 2 * qweight.shape[1]).astype(dtype)


def attention_decode(xp, q, k, v, bias, sqrt_hd):
    """Twin of the kernels attention_decode_f16 / _f32 and attention_combine: one token's attention per head.

    q (nh, hd) float32; k, v (nh, S, hd) float16 or float32, the attended cache positions; bias (nh or 1, S)
    float32 -> (nh, hd) float32. The kernels' split into chunks of ATTENTION_CHUNK keys and their order of sums;
    CUDA's expf may differ from NumPy's exp in the last bit, so they agree to float32 rounding, not bit for bit."""
    m, l, o = attention_chunks(xp, q, k, v, bias, sqrt_hd)
    if m.shape[1] == 1:                                           # one chunk: attention_decode writes o / l
        return flush(o[:, 0] / l[:, 0, None])
    return attention_combine(xp, m, l, o)


def attention_chunks(xp, q, k, v, bias, sqrt_hd):
    """attention_decode's blocks: for each head and chunk of keys, the max score m, the sum l of e = exp(s - m)
    and o = sum of e v: (nh, chunks), (nh, chunks), (nh, chunks, hd)."""
    nh, S, hd = k.shape
    chunks = -(-S // ATTENTION_CHUNK)
    width = chunks * ATTENTION_CHUNK
    minus_inf = xp.float32(-np.inf)
    q, k32, v32, bias = flush(q), flush(k.astype(xp.float32)), flush(v.astype(xp.float32)), flush(bias)
    dot = xp.zeros((nh, S), dtype=xp.float32)
    for d in range(hd):                                           # thread per key: dims in order
        dot = flush(dot + flush(q[:, d:d + 1] * k32[:, :, d]))
    scores = flush(flush(dot / xp.float32(sqrt_hd)) + bias)
    scores = xp.concatenate([scores, xp.full((nh, width - S), minus_inf, dtype=xp.float32)], axis=1)
    scores = scores.reshape(nh, chunks, ATTENTION_CHUNK)
    m = scores.max(axis=2)
    shift = xp.where(m == minus_inf, xp.float32(0.0), m)          # a chunk all masked: e = 0
    e = flush(xp.exp(flush(scores - shift[..., None])))
    l = block_sums(xp, e.reshape(nh * chunks, ATTENTION_CHUNK), ATTENTION_CHUNK).reshape(nh, chunks)

    rounds = ATTENTION_CHUNK // ATTENTION_WARPS                   # warp w: keys w, w + WARPS, ... of its chunk
    v_padded = xp.concatenate([v32, xp.zeros((nh, width - S, hd), dtype=xp.float32)], axis=1)
    e_by_warp = e.reshape(nh, chunks, rounds, ATTENTION_WARPS, 1)
    v_by_warp = v_padded.reshape(nh, chunks, rounds, ATTENTION_WARPS, hd)
    acc = xp.zeros((nh, chunks, ATTENTION_WARPS, hd), dtype=xp.float32)
    for r in range(rounds):
        acc = flush(acc + flush(e_by_warp[:, :, r] * v_by_warp[:, :, r]))
    o = acc[:, :, 0]
    for w in range(1, ATTENTION_WARPS):
        o = flush(o + acc[:, :, w])
    return m, l, o


def attention_combine(xp, m, l, o):
    """Twin of the kernel attention_combine: the chunks of each head joined, in order -> (nh, hd)."""
    nh, chunks, hd = o.shape
    scale = flush(xp.exp(flush(m - m.max(axis=1, keepdims=True))))
    total, out = xp.zeros((nh, 1), dtype=xp.float32), xp.zeros((nh, hd), dtype=xp.float32)
    for c in range(chunks):
        total = flush(total + flush(l[:, c:c + 1] * scale[:, c:c + 1]))
        out = flush(out + flush(o[:, c] * scale[:, c:c + 1]))
    return flush(out / total)


def rms_norm_f32(xp, x, weight, eps):
    """Twin of the kernel rms_norm_f32: x (T, n) float32, weight (n,) -> x * (1 / sqrt(mean(x^2) + eps)) * weight,
    the sum of squares in the kernel's order (IEEE sqrt and division: equal to the kernel bit for bit)."""
    n = x.shape[1]
    x, weight = flush(x), flush(weight)
    total = block_sums(xp, flush(x * x), NORM_THREADS)
    r = flush(1.0 / flush(xp.sqrt(flush(flush(total / xp.float32(n)) + xp.float32(eps)))))
    return flush(flush(x * r[:, None]) * weight)


def silu_mul_f32(xp, gate, up):
    """Twin of the kernel silu_mul_f32: silu(gate) * up (CUDA's expf may differ from NumPy's exp in the last bit)."""
    gate = flush(gate)
    return flush(flush(gate / flush(1.0 + flush(xp.exp(-gate)))) * flush(up))


# --- a linear weight on the device -------------------------------------------------------------------------------

class DeviceQuantizedWeight(QuantizedWeight):
    """A linear weight W (out_features, in_features) on the device, padded with zero columns to whole blocks:
    bits 8 / 4: `qweight`, `scales` as in bcnp.quant; bits 16: `qweight` holds the float16 values, no scales.

    `matmul(x)`, x (T, in_features) float32 -> float32 (T, out_features):
    - T = 1 (decode): the matvec kernel, straight from the stored form; float32 products and sums.
    - T > 1 (prefill): W expanded to `dtype` (float16 or float32) in a scratch array, then cuBLAS; float16
      operands are multiplied with float32 accumulation (CuPy's default compute type for float16).
    With `kernels` None (an array module other than CuPy) the NumPy twins stand in for the kernels."""

    def __init__(self, xp, qweight, scales, bits, in_features, dtype, kernels=None):
        if bits not in (8, 4, 16):
            raise ValueError(f"DeviceQuantizedWeight: bits must be 8, 4 or 16, got {bits!r}")
        self.xp, self.qweight, self.scales, self.bits = xp, qweight, scales, bits
        self.out_features, self.in_features = qweight.shape[0], int(in_features)
        self.in_padded = padded_width(self.in_features)
        self.dtype, self.kernels = np.dtype(dtype), kernels

    @property
    def nbytes(self):
        return self.qweight.nbytes + (0 if self.scales is None else self.scales.nbytes)

    def __repr__(self):
        return f"DeviceQuantizedWeight(shape={self.shape}, bits={self.bits}, nbytes={self.nbytes})"

    def matmul(self, x):
        xp = self.xp
        if x.ndim == 1:
            return self.matmul(x[None])[0]
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self!r}: input has {x.shape[-1]} features, expected {self.in_features}")
        x = xp.ascontiguousarray(pad_columns(xp, x.astype(xp.float32, copy=False), self.in_padded))
        if x.shape[0] == 1:
            return self.matvec(x[0])[None]
        w = self.expanded(self.dtype)                                       # (out, in_padded)
        if w.dtype == np.float32:
            return x @ w.T
        with np.errstate(over="ignore", invalid="ignore"):                  # (the twin's) checked below
            if self.kernels is not None:
                y = xp.matmul(x.astype(xp.float16), w.T)                   # cublasGemmEx, float32 compute
            else:                                                           # its twin: the same operands, float32 sums
                y = (x.astype(xp.float16).astype(xp.float32) @ w.astype(xp.float32).T).astype(xp.float16)
        # An activation or a product beyond float16's 65504 became infinity (the original computes in bfloat16,
        # whose range is float32's): then this product again in float32. The check is one reduction and one
        # synchronisation per linear per prefill, not per token.
        if not bool(xp.isfinite(y).all()):
            del w, y
            return x @ self.expanded(np.float32).T
        return y.astype(xp.float32)

    def matvec(self, x, residual=None):
        """W x (plus `residual`, (out_features,) float32, if given) for x float32 (in_padded,), contiguous ->
        float32 (out_features,): one kernel either way."""
        xp = self.xp
        if self.kernels is None:
            y = self.twin(x)
            return y if residual is None else add_residual(residual, y)
        if x.data.ptr % 16:                                                 # the kernels read x as float4
            x = x.copy()
        y = xp.empty(self.out_features, dtype=xp.float32)
        name = "matvec_f16" if self.bits == 16 else f"matvec_q{self.bits}_0"
        ending = () if residual is None else (xp.ascontiguousarray(residual),)
        self.kernels[name + ("" if residual is None else "_add")](
            self.grid(), (MATVEC_THREADS,), (*self.stored(), x, *ending, y, *self.sizes()))
        return y

    def swiglu(self, up, x):
        """silu(W x) * (U x) for this weight W (gate_proj) and `up` U, x float32 (in_padded,) contiguous: both
        weights in one pass over x, one kernel."""
        xp = self.xp
        if self.kernels is None:
            return silu_mul_f32(xp, self.twin(x), up.twin(x))
        if x.data.ptr % 16:
            x = x.copy()
        y = xp.empty(self.out_features, dtype=xp.float32)
        name = "matvec_f16_swiglu" if self.bits == 16 else f"matvec_q{self.bits}_0_swiglu"
        self.kernels[name](self.grid(), (MATVEC_THREADS,), (*self.stored(), *up.stored(), x, y, *self.sizes()))
        return y

    def twin(self, x):
        """The NumPy twin of this weight's matvec kernel."""
        if self.bits == 16:
            return matvec_f16(self.xp, self.qweight, x)
        return (matvec_q8_0 if self.bits == 8 else matvec_q4_0)(self.xp, self.qweight, self.scales, x)

    def stored(self):
        return (self.qweight,) if self.bits == 16 else (self.qweight, self.scales)

    def sizes(self):
        return np.int32(self.out_features), np.int32(self.in_padded)

    def grid(self):
        return (-(-self.out_features // MATVEC_ROWS_PER_BLOCK),)

    def vector(self, x):
        """x (1, in_features) -> float32 (in_padded,), contiguous: what the matvec kernels read."""
        if x.shape != (1, self.in_features):
            raise ValueError(f"{self!r}: expected one token of {self.in_features} features, got {x.shape}")
        return self.xp.ascontiguousarray(pad_columns(self.xp, x.astype(self.xp.float32, copy=False),
                                                     self.in_padded)[0])

    def expanded(self, dtype):
        """W as `dtype` (float16 or float32), (out_features, in_padded): a new array (float16 weights as float16:
        themselves)."""
        xp, dtype = self.xp, np.dtype(dtype)
        if self.bits == 16:
            return self.qweight if dtype == np.float16 else self.qweight.astype(dtype)
        if self.kernels is None:
            twin = dequantize_q8_0 if self.bits == 8 else dequantize_q4_0
            return twin(xp, self.qweight, self.scales, dtype)
        out = xp.empty((self.out_features, self.in_padded), dtype=dtype)
        words = self.out_features * self.in_padded // (4 if self.bits == 8 else 8)
        name = f"dequantize_q{self.bits}_0_{'f16' if dtype == np.float16 else 'f32'}"
        grid = (min(-(-words // DEQUANTIZE_THREADS), 65536),)              # the kernel loops over the rest
        self.kernels[name](grid, (DEQUANTIZE_THREADS,),
                           (self.qweight, self.scales, out, np.int32(self.out_features), np.int32(self.in_padded)))
        return out

    def dequantize(self):
        """float32 (out_features, in_features), on the device."""
        return self.expanded(np.float32)[:, : self.in_features]


# --- decode on the device: the cache, CUDA graphs, the model ------------------------------------------------------

@dataclass
class DeviceKVCache(KVCache):
    """The KV cache on the device: one new token attends in the kernel attention_decode (the cache read as it is
    stored, float16 or float32; one launch per layer, two beyond 256 positions); several tokens (prefill) as on
    the CPU.
    With `kernels` None (an array module other than CuPy) the kernel's NumPy twin stands in."""
    kernels: object = None

    def store(self, i, k, v):
        if self.k.dtype == np.float16:                   # as the kernel kv_store_f16: saturate, not infinity
            k, v = clamp_to_float16(k), clamp_to_float16(v)
        super().store(i, k, v)

    def attend(self, xp, i, q, bias):
        nh, T, hd = q.shape
        S = bias.shape[-1]
        if T != 1 or hd > WARP * MAX_DIMS_PER_LANE:
            return super().attend(xp, i, q, bias)
        bias = bias.reshape(bias.shape[0], S)                                # (nh or 1, S)
        sqrt_hd = math.sqrt(hd)
        if self.kernels is None:
            return attention_decode(xp, q[:, 0], self.k[i, :, :S], self.v[i, :, :S], bias, sqrt_hd)[:, None]
        chunks = -(-S // ATTENTION_CHUNK)
        out = xp.empty((nh, hd), dtype=xp.float32)
        scratch = xp.empty((nh, chunks, hd + 2) if chunks > 1 else (1,), dtype=xp.float32)
        name = "attention_decode_f16" if self.k.dtype == np.float16 else "attention_decode_f32"
        q, bias = xp.ascontiguousarray(q.reshape(nh, hd)), xp.ascontiguousarray(bias)
        self.kernels[name]((nh, chunks), (ATTENTION_CHUNK,),
                           (q, self.k[i], self.v[i], bias, out, scratch, np.int32(S), np.int32(hd),
                            np.int32(self.max_len * hd), np.int32(S if bias.shape[0] > 1 else 0),
                            np.float32(sqrt_hd)))
        if chunks > 1:
            self.kernels["attention_combine"]((nh,), (-(-hd // WARP) * WARP,),
                                              (scratch, out, np.int32(chunks), np.int32(hd)))
        return out[:, None]


@dataclass
class GraphKVCache(DeviceKVCache):
    """A one-token step over a DeviceKVCache's arrays whose position is read from the device array `position`
    and which attends to a fixed `window` of positions (those past the token's own are masked): its kernels and
    shapes do not depend on the position, so a CUDA graph of it serves every position inside the window."""
    position: object = None                                                 # (1,) int64, on the device
    window: int = 0

    def positions(self, xp, T):
        assert T == 1, "a graph step decodes one token"
        return self.position

    def span(self, T):
        return self.window

    def store(self, i, k, v):
        if self.kernels is None:                                            # the kernel kv_store's twin
            if self.k.dtype == np.float16:
                k, v = clamp_to_float16(k), clamp_to_float16(v)
            self.k[i][:, self.position] = k.transpose(1, 0, 2).astype(self.k.dtype)     # (nh, 1, hd)
            self.v[i][:, self.position] = v.transpose(1, 0, 2).astype(self.v.dtype)
            return
        nh, hd = k.shape[1], k.shape[2]
        name = "kv_store_f16" if self.k.dtype == np.float16 else "kv_store_f32"
        self.kernels[name]((-(-nh * hd // ELEMENTWISE_THREADS),), (ELEMENTWISE_THREADS,),
                           (k.reshape(nh * hd), v.reshape(nh * hd), self.k[i], self.v[i], self.position,
                            np.int32(nh), np.int32(hd), np.int32(self.max_len)))


FLOAT16_MAX = 65504.0


def clamp_to_float16(a):
    """a (float32) limited to float16's finite range, NaN kept: what a float16 KV cache stores. A key or value
    beyond 65504 would otherwise be stored as infinity, and every later score of its head would be NaN; clamping
    keeps the model running, as other float16 engines do (a ggml_clamp(v, -65504, 65504) before the cast to
    the cache). to_device(model, dtype="float32") keeps such values exactly."""
    return a.clip(-FLOAT16_MAX, FLOAT16_MAX)


def add_linear(x, a, weight):
    """x + a @ weight.T for one token: a device weight adds the residual x in its matvec kernel."""
    if isinstance(weight, DeviceQuantizedWeight):
        return weight.matvec(weight.vector(a), residual=x[0])[None]
    return x + linear(a, weight)


def swiglu(xp, kernels, h, gate, up):
    """silu(gate_proj(h)) * up_proj(h) for one token: device weights of one kind in one kernel."""
    if isinstance(gate, DeviceQuantizedWeight) and isinstance(up, DeviceQuantizedWeight) and gate.bits == up.bits \
            and gate.shape == up.shape:
        return gate.swiglu(up, gate.vector(h))[None]
    return silu_mul_on_device(xp, kernels, linear(h, gate), linear(h, up))


def rms_norm_on_device(xp, kernels, x, weight, eps):
    """bcnp.model.rms_norm in one kernel (its twin without `kernels`)."""
    if kernels is None:
        return rms_norm_f32(xp, x, weight, eps)
    x = xp.ascontiguousarray(x)
    out = xp.empty_like(x)
    kernels["rms_norm_f32"]((x.shape[0],), (NORM_THREADS,), (x, weight, out, np.int32(x.shape[1]), np.float32(eps)))
    return out


def silu_mul_on_device(xp, kernels, gate, up):
    """silu(gate) * up in one kernel (its twin without `kernels`)."""
    if kernels is None:
        return silu_mul_f32(xp, gate, up)
    out = xp.empty_like(gate)
    kernels["silu_mul_f32"]((-(-gate.size // ELEMENTWISE_THREADS),), (ELEMENTWISE_THREADS,),
                            (gate, up, out, np.int32(gate.size)))
    return out


def decode_layer(xp, x, w, i, config, cache, positions, bias, inv_freq):
    """bcnp.model.decoder_layer for one token on a GraphKVCache, in 8 launches: the same steps, with each RMSNorm
    one kernel (the CPU's code: 7 array operations), the residual adds inside o_proj's and down_proj's matvecs,
    and gate_proj, up_proj and silu(gate) * up one kernel. In a CUDA graph a small step costs its launch, not
    its arithmetic."""
    p = f"model.layers.{i}."
    H, nh, hd, eps = config.hidden_size, config.num_attention_heads, config.head_dim, config.rms_norm_eps

    h = rms_norm_on_device(xp, cache.kernels, x, w[p + "input_layernorm.weight"], eps)
    qkv = linear(h, w[p + "self_attn.W_pack.weight"])                       # (1, 3H): q | k | v
    q, k, v = (qkv[:, j * H:(j + 1) * H].reshape(1, nh, hd) for j in range(3))
    if inv_freq is not None:
        q, k = rope(xp, q, positions, inv_freq), rope(xp, k, positions, inv_freq)

    cache.store(i, k, v)
    out = cache.attend(xp, i, q.transpose(1, 0, 2), bias)                   # (nh, 1, hd)
    x = add_linear(x, out.reshape(1, H), w[p + "self_attn.o_proj.weight"])

    h = rms_norm_on_device(xp, cache.kernels, x, w[p + "post_attention_layernorm.weight"], eps)
    act = swiglu(xp, cache.kernels, h, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"])
    return add_linear(x, act, w[p + "mlp.down_proj.weight"])


class DecodeGraphs:
    """One-token decode steps on a DeviceKVCache, replayed from CUDA graphs.

    Launching a step's ~340 kernels (8 a layer, decode_layer) one by one from Python costs more than the GPU
    needs to run them. A step's kernels and shapes are fixed by its window (the positions it attends to,
    rounded up to WINDOW) and its token and position are read from device arrays, so the first step in each
    window runs eagerly (compiling kernels, sizing the memory pool) and is then captured; the rest of the
    window replays the graph: one launch per token. On an array module other than CuPy every step runs the same
    code op by op, which lets the CPU prove the fixed-shape step computes what transformer() does.

    Memory: a graph writes to the addresses its capture allocated, at every replay, but CuPy takes a buffer back
    into its pool as soon as Python drops it. In the default pool, those addresses would go to other arrays, and
    `free_all_blocks()` (which CuPy itself calls on an out-of-memory) would hand them back to the driver: silent
    corruption or an illegal address. So each window's eager step and capture allocate from a MemoryPool of
    their own, kept with the graph (`self.graphs[window]`) and used by nothing else: after the capture no one
    allocates from it again, and the pool lives as long as the graph.

    The cache keeps its DecodeGraphs (`cache.decoder`) but the DecodeGraphs does not keep the cache: no reference
    cycle, so a dropped cache frees its KV arrays, graphs and pools at once, not at the next cycle collection."""
    WINDOW = 256

    def __init__(self, model):
        xp = model.xp
        self.model = model
        self.token = xp.zeros(1, dtype=xp.int64)
        self.position = xp.zeros(1, dtype=xp.int64)
        self.graphs = {}                                    # window -> (graph, logits it writes, its memory pool)
        self.stream = xp.cuda.Stream(non_blocking=True) if is_cupy(xp) else None    # capture needs its own stream

    def window(self, cache):
        return min(-(-(cache.length + 1) // self.WINDOW) * self.WINDOW, cache.max_len)

    def step(self, cache, token):
        """Host float32 logits (V,) after appending `token` to `cache`."""
        xp = self.model.xp
        if cache.length + 1 > cache.max_len:
            raise ValueError(f"{cache.length} cached + 1 new token exceed the context of {cache.max_len}")
        if self.stream is None:
            return to_numpy(self._run(cache, token))
        self.stream.wait_event(xp.cuda.get_current_stream().record())      # after the prefill, on its stream
        with self.stream:
            return self._run(cache, token).get()                            # .get() waits for the stream

    def _run(self, cache, token):
        xp, model = self.model.xp, self.model
        window = self.window(cache)
        self.token[...] = token                                             # fills on the device: no copy to record
        self.position[...] = cache.length
        if window in self.graphs:
            graph, logits, _ = self.graphs[window]
            graph.launch(self.stream)
        elif self.stream is not None and model.graphs:
            pool = xp.cuda.MemoryPool()
            with xp.cuda.using_allocator(pool.malloc):
                logits = self._forward(cache, window)                       # eager: compiles, sizes the pool
                self._capture(cache, window, pool)
        else:
            logits = self._forward(cache, window)
        cache.length += 1
        return logits[0]

    def _forward(self, cache, window):
        model = self.model
        step = GraphKVCache(cache.k, cache.v, cache.length, cache.kernels, position=self.position, window=window)
        return transformer(model.xp, model.w, model.config, self.token, step, last_only=True, layer=decode_layer)

    def _capture(self, cache, window, pool):
        """Record the step at `window` (nothing runs: the eager step before did the work), allocating from
        `pool`, which the graph then keeps."""
        model = self.model
        try:
            self.stream.begin_capture()
            try:
                logits = self._forward(cache, window)
            except Exception:
                try:
                    self.stream.end_capture()                              # leave capture mode, keep the cause
                except Exception:
                    pass
                raise
            self.graphs[window] = (self.stream.end_capture(), logits, pool)
        except Exception as e:                 # a CuPy or driver that cannot capture this: decode op by op
            model.graphs = False
            warnings.warn(f"CUDA graph capture failed, decoding without graphs: {first_line(e)}", RuntimeWarning)


class DeviceModel(Model):
    """A Model whose weights are on the GPU (or on the tests' strict module): DeviceKVCaches, and one-token steps
    replayed from CUDA graphs (`graphs = False`: launched op by op).

    Graphs are on when every linear weight multiplies in bcnp's kernels (float16 or quantized weights); float32
    weights (`to_device(dtype="float32")`, the golden-test mode) multiply in cuBLAS, which CuPy does not
    promise to record into a graph, so that mode decodes op by op."""

    def __init__(self, *args, kernels=None, graphs=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kernels = kernels
        if graphs is None:
            graphs = all(isinstance(v, DeviceQuantizedWeight) for k, v in self.w.items() if is_linear(k))
        self.graphs = graphs

    def new_cache(self, max_len=None):
        c = new_cache(self.xp, self.config, max_len, self.cache_dtype)
        return DeviceKVCache(c.k, c.v, kernels=self.kernels)

    def next_logits(self, ids, cache):
        ids = self._check_ids(ids)
        if len(ids) != 1 or not isinstance(cache, DeviceKVCache):
            return super().next_logits(ids, cache)
        decoder = getattr(cache, "decoder", None)
        if decoder is None:
            decoder = cache.decoder = DecodeGraphs(self)
        return decoder.step(cache, int(ids[0]))

    def forward(self, ids, cache):
        ids = self._check_ids(ids)
        if len(ids) == 1:
            return self.next_logits(ids, cache)[None]
        return super().forward(ids, cache)


# --- moving a model ------------------------------------------------------------------------------------------------

def to_device(model, xp=None, dtype="float16"):
    """`model` with its weights on the GPU (CuPy), or on the array module `xp` (the tests' strict module).

    dtype "float16": float weights stored as float16, prefill in float16 with float32 accumulation, float16
    KV cache. "float32": float32 weights, prefill and cache (the CPU's numbers; twice the memory).
    Quantized weights move as they are. One tensor at a time: a memory-mapped checkpoint is read tensor by
    tensor and no host copy is kept."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"to_device: dtype must be 'float16' or 'float32', got {dtype!r}")
    if model.xp is not np:
        if xp is None or xp is model.xp:
            return model
        raise ValueError("to_device: the model is not on the CPU; move it back with model.cpu() first")
    xp = get_cupy() if xp is None else xp
    kernels = cuda_kernels(xp) if is_cupy(xp) else None
    float_dtype = np.dtype(dtype)
    w = {}
    for name in weight_names(model.w):
        value = host_weight(model.w, name, float16=float_dtype == np.float16 and (
            is_linear(name) or name == "model.embed_tokens.weight"))
        if isinstance(value, QuantizedWeight):
            w[name] = DeviceQuantizedWeight(xp, xp.asarray(value.qweight), xp.asarray(value.scales), value.bits,
                                            value.in_features, float_dtype, kernels)
        elif is_linear(name) and float_dtype == np.float16:
            padded = pad_columns(np, value, padded_width(value.shape[1]))
            w[name] = DeviceQuantizedWeight(xp, xp.asarray(padded), None, 16, value.shape[1], float_dtype, kernels)
        else:
            w[name] = xp.asarray(np.ascontiguousarray(value))
        del value                                       # the host copy goes before the next tensor is read
    return DeviceModel(model.config, w, xp, model.tokenizer, model.generation_config, model.path,
                       cache_dtype=float_dtype, kernels=kernels)


def weight_names(w):
    return w.names() if isinstance(w, CheckpointWeights) else list(w)


def host_weight(w, name, float16):
    """One weight on the host: a QuantizedWeight as it is, a float array as float16 or float32. A lazily read
    checkpoint tensor is converted now and not kept in `w`."""
    if isinstance(w, CheckpointWeights) and name not in w:
        return w.read(name, float16)
    value = w[name]
    if isinstance(value, QuantizedWeight):
        return value
    value = np.asarray(value)
    if not float16:
        return value.astype(np.float32, copy=False)
    with np.errstate(over="ignore"):
        half = value.astype(np.float16)
    if np.isinf(half).any() and np.isfinite(value).all():
        raise ValueError(f"{name}: holds {float(np.abs(value).max()):g}, beyond float16's range (max 65504); "
                         "use to_device(model, dtype='float32')")
    return half


def to_host(model):
    """`model` back on the CPU: float weights as float32 NumPy arrays, quantized ones as QuantizedWeight (the
    embedding of a quantized model as float16, as Model.quantize leaves it)."""
    if model.xp is np:
        return model
    quantized = any(isinstance(v, DeviceQuantizedWeight) and v.bits != 16 for v in model.w.values())
    w = {}
    for name, value in model.w.items():
        if isinstance(value, DeviceQuantizedWeight) and value.bits != 16:
            w[name] = QuantizedWeight(value.qweight.get(), value.scales.get(), value.bits, value.in_features)
        elif isinstance(value, DeviceQuantizedWeight):
            w[name] = value.qweight.get()[:, : value.in_features].astype(np.float32)
        else:
            keep_float16 = quantized and name == "model.embed_tokens.weight"
            w[name] = value.get().astype(np.float16 if keep_float16 else np.float32)
    return model._with_weights(w, np)
