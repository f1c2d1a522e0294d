"""Weights on the device: `DeviceQuantizedWeight`, and the passes that move a weight dict there and back.

`device_weights` copies the weights to the device one tensor at a time: float linear weights as float16
DeviceQuantizedWeights (bits 16) or float32 arrays, quantized ones as they are, the rest (norms, RoPE's table,
the embedding) as arrays; `host_weights` brings them back as bcnp.quant.QuantizedWeight and NumPy arrays.
"""
import numpy as np

from ..layout import EMBEDDING, is_linear, padded_width
from ..quant import QuantizedWeight
from .kernels import (DEQUANTIZE_THREADS, MATVEC_ROWS_PER_BLOCK, MATVEC_THREADS, add_residual, dequantize_q4_0,
                      dequantize_q8_0, matvec_f16, matvec_q4_0, matvec_q8_0, pad_columns, silu_mul_f32)

class DeviceQuantizedWeight:
    """A linear weight W (out_features, in_features) on the device, padded with zero columns to whole blocks:
    bits 8 / 4: `qweight`, `scales` as in bcnp.quant; bits 16: `qweight` holds the float16 values, no scales.

    `matmul(x)`, x (T, in_features) float32 -> float32 (T, out_features):
    - T = 1 (decode): the matvec kernel, straight from the stored form; float32 products and sums.
    - T > 1 (prefill): W expanded to `dtype` (float16 or float32) in a scratch array, then cuBLAS; float16
      operands are multiplied with float32 accumulation (CuPy's default compute type for float16).
    With `kernels` None (an array module other than CuPy) the NumPy twins stand in for the kernels. `x_bits`: the
    CPU's rounding of x (bcnp.quant.QuantizedWeight), kept for the way back; the device multiplies x unrounded."""

    def __init__(self, xp, qweight, scales, bits, in_features, dtype, kernels=None, x_bits=None):
        if bits not in (8, 4, 16):
            raise ValueError(f"DeviceQuantizedWeight: bits must be 8, 4 or 16, got {bits!r}")
        self.xp, self.qweight, self.scales, self.bits = xp, qweight, scales, bits
        self.out_features, self.in_features = qweight.shape[0], int(in_features)
        self.in_padded = padded_width(self.in_features)
        self.dtype, self.kernels, self.x_bits = np.dtype(dtype), kernels, x_bits

    @property
    def shape(self):
        return (self.out_features, self.in_features)

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



# --- the passes ----------------------------------------------------------------------------------------------------

def host_dtype(name, dtype):
    """The float dtype weight `name` is read as on the host before it moves: with dtype float16, the linear
    weights and the embedding (the bulk of the bytes); the norms and RoPE's table stay float32."""
    return np.float16 if dtype == np.float16 and (is_linear(name) or name == EMBEDDING) else np.float32


def device_weights(xp, weights, dtype, kernels=None):
    """{name: value on the device} from (name, host value) pairs (bcnp.weights.materialised), one tensor at a
    time: a QuantizedWeight as its blocks, a float16 linear weight padded to whole blocks (bits 16), any other
    array as it is. Each host value is dropped before the next is read."""
    w = {}
    for name, value in weights:
        if isinstance(value, QuantizedWeight):
            w[name] = DeviceQuantizedWeight(xp, xp.asarray(value.qweight), xp.asarray(value.scales), value.bits,
                                            value.in_features, dtype, kernels, value.x_bits)
        elif is_linear(name) and dtype == np.float16:
            padded = pad_columns(np, value, padded_width(value.shape[1]))
            w[name] = DeviceQuantizedWeight(xp, xp.asarray(padded), None, 16, value.shape[1], dtype, kernels)
        else:
            w[name] = xp.asarray(np.ascontiguousarray(value))
        del value                                       # the host copy goes before the next tensor is read
    return w


def host_weights(w):
    """{name: host value} of device weights: float weights as float32 NumPy arrays, quantized ones as
    QuantizedWeight (the embedding of a quantized model as float16, as bcnp.weights.quantized leaves it)."""
    quantized = any(isinstance(v, DeviceQuantizedWeight) and v.bits != 16 for v in w.values())
    host = {}
    for name, value in w.items():
        if isinstance(value, DeviceQuantizedWeight) and value.bits != 16:
            host[name] = QuantizedWeight(value.qweight.get(), value.scales.get(), value.bits, value.in_features,
                                         value.x_bits)
        elif isinstance(value, DeviceQuantizedWeight):
            host[name] = value.qweight.get()[:, : value.in_features].astype(np.float32)
        else:
            keep_float16 = quantized and name == EMBEDDING
            host[name] = value.get().astype(np.float16 if keep_float16 else np.float32)
    return host
