"""The GPU: the forward pass of bcnp.model run by CuPy, with CUDA kernels for the linear layers.

    model = Model.from_pretrained(path).quantize(8).cuda()     # = to_device(model)

`to_device` copies the weights to the GPU one tensor at a time: float weights as float16 (the norms stay
float32), quantized ones as they are, and returns a Model whose array module is `cupy`, so `bcnp.model` runs the
same lines as on the CPU; its KV cache is float16 on the GPU. Activations and every sum stay float32.

Each linear weight becomes a `DeviceQuantizedWeight` (8 or 4 bits, or 16 for float16 values): one token
(decode) multiplies in a matvec kernel that reads the weights once, straight from their compact form; several
tokens (prefill) expand the weights into a float16 scratch and multiply with cuBLAS (float32 accumulation).
`to_device(model, dtype="float32")` keeps float32 weights, float32 prefill and a float32 cache instead: the same
numbers as the CPU, for the golden tests.

The kernels live in bcnp/cuda/quant_kernels.cu. Each has a NumPy twin below, written against an array module
`xp`, doing the same float32 operations in the same order; the tests check the twins against bcnp.quant on the
CPU and the kernels against the twins on a GPU. `to_device(model, xp=module)` with any module other than CuPy
runs the twins instead of the kernels: the tests run the whole forward pass that way on a module that refuses
implicit conversions to NumPy, as CuPy does (tests/strict_xp.py), so a stray `np.` call fails without a GPU.
"""
import os

import numpy as np

from .model import CheckpointWeights, Model
from .quant import BLOCK, QuantizedWeight, is_linear, padded_width

KERNEL_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda", "quant_kernels.cu")
KERNEL_NAMES = ("matvec_q8_0", "matvec_q4_0", "matvec_f16", "dequantize_q8_0_f32", "dequantize_q8_0_f16",
                "dequantize_q4_0_f32", "dequantize_q4_0_f16")
WARP = 32
MATVEC_THREADS, MATVEC_ROWS_PER_BLOCK = 64, 8      # WARPS * 32 threads and WARPS * ROWS rows in quant_kernels.cu
DEQUANTIZE_THREADS = 256


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
            module = cupy.RawModule(code=f.read(), options=("-std=c++17",))
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

def pad_columns(xp, a, width):
    """a (..., n) with zero columns appended up to `width`."""
    if a.shape[-1] == width:
        return a
    return xp.concatenate([a, xp.zeros(a.shape[:-1] + (width - a.shape[-1],), dtype=a.dtype)], axis=-1)


def word_sums(values, x):
    """((v0 x0 + v1 x1) + v2 x2) + ..., over the last axis, in the kernel's order (no pairwise summation)."""
    products = values * x
    s = 0.0 + products[..., 0]
    for k in range(1, products.shape[-1]):
        s = s + products[..., k]
    return s


def warp_sums(xp, terms):
    """terms (rows, steps, 32): each lane's running sum over the steps, then the warp's halving sum (lane 0)."""
    acc = xp.zeros((terms.shape[0], WARP), dtype=xp.float32)
    for step in range(terms.shape[1]):
        acc = acc + terms[:, step]
    for offset in (16, 8, 4, 2, 1):
        acc = acc + acc[:, [lane ^ offset for lane in range(WARP)]]
    return acc[:, 0]


def matvec_q8_0(xp, qweight, scales, x):
    """Twin of the kernel matvec_q8_0: W x for qweight int8 (R, n_pad), scales float16 (R, n_pad/32), x float32
    (n_pad,) -> float32 (R,). A step covers 32 words of 4 values; a block is 8 words."""
    rows, n_pad = qweight.shape
    steps = -(-n_pad // (4 * WARP))
    width = 4 * WARP * steps
    values = pad_columns(xp, qweight.astype(xp.float32), width).reshape(rows, steps, WARP, 4)
    xs = pad_columns(xp, x, width).reshape(steps, WARP, 4)
    d = xp.repeat(pad_columns(xp, scales.astype(xp.float32), width // BLOCK), 8, axis=1).reshape(rows, steps, WARP)
    return warp_sums(xp, word_sums(values, xs) * d)


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
    xs = xs.transpose(0, 1, 3, 2, 4).reshape(steps, WARP, 8)
    d = xp.repeat(pad_columns(xp, scales.astype(xp.float32), blocks), 4, axis=1).reshape(rows, steps, WARP)
    return warp_sums(xp, word_sums(values, xs) * d)


def matvec_f16(xp, weight, x):
    """Twin of the kernel matvec_f16: W x for weight float16 (R, n_pad), x float32 (n_pad,) -> float32 (R,)."""
    rows, n_pad = weight.shape
    steps = -(-n_pad // (4 * WARP))
    width = 4 * WARP * steps
    values = pad_columns(xp, weight.astype(xp.float32), width).reshape(rows, steps, WARP, 4)
    return warp_sums(xp, word_sums(values, pad_columns(xp, x, width).reshape(steps, WARP, 4)))


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
        if self.kernels is not None:
            y = xp.matmul(x.astype(xp.float16), w.T)                       # cublasGemmEx, float32 compute
        else:                                                               # its twin: the same operands, float32 sums
            y = (x.astype(xp.float16).astype(xp.float32) @ w.astype(xp.float32).T).astype(xp.float16)
        return y.astype(xp.float32)

    def matvec(self, x):
        """W x for x float32 (in_padded,), contiguous -> float32 (out_features,)."""
        xp = self.xp
        if self.kernels is None:
            if self.bits == 16:
                return matvec_f16(xp, self.qweight, x)
            twin = matvec_q8_0 if self.bits == 8 else matvec_q4_0
            return twin(xp, self.qweight, self.scales, x)
        if x.data.ptr % 16:                                                 # the kernels read x as float4
            x = x.copy()
        y = xp.empty(self.out_features, dtype=xp.float32)
        rows, n_pad = np.int32(self.out_features), np.int32(self.in_padded)
        grid = (-(-self.out_features // MATVEC_ROWS_PER_BLOCK),)
        if self.bits == 16:
            self.kernels["matvec_f16"](grid, (MATVEC_THREADS,), (self.qweight, x, y, rows, n_pad))
        else:
            kernel = self.kernels["matvec_q8_0" if self.bits == 8 else "matvec_q4_0"]
            kernel(grid, (MATVEC_THREADS,), (self.qweight, self.scales, x, y, rows, n_pad))
        return y

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
    device_model = Model(model.config, w, xp, model.tokenizer, model.generation_config, model.path,
                         cache_dtype=float_dtype)
    return device_model


def weight_names(w):
    return w.names() if isinstance(w, CheckpointWeights) else list(w)


def host_weight(w, name, float16):
    """One weight on the host: a QuantizedWeight as it is, a float array as float16 or float32. A lazily read
    checkpoint tensor is converted now and not kept in `w`."""
    if isinstance(w, CheckpointWeights) and name not in w:
        tensor = w.tensor(name)
        return tensor.float16() if float16 else tensor.float32()
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
