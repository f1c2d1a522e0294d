"""The CUDA kernels of bcnp/cuda/quant_kernels.cu: loading them with CuPy, and a NumPy twin of each.

The kernels are compiled once per device by `cuda_kernels` (cupy.RawModule, NVRTC). Each has a NumPy twin
below, written against an array module `xp`, doing the same float32 operations in the same order, subnormals
flushed to zero as CuPy's -ftz=true makes the kernels do; the tests check the twins against bcnp.quant and
bcnp.forward on the CPU and the kernels against the twins on a GPU. Where `kernels` is None (an array module
other than CuPy: the tests' strict module) the twins stand in for the kernels.
"""
import os

import numpy as np

from ..layout import BLOCK_SIZE as BLOCK

KERNEL_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda", "quant_kernels.cu")
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


def rms_norm_on_device(xp, kernels, x, weight, eps):
    """bcnp.forward.rms_norm in one kernel (its twin without `kernels`)."""
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

