"""The weights: passes from a checkpoint's tensors to what the forward pass multiplies with, one tensor at a time.

Each pass turns a weight dict (by checkpoint name) into another; the later ones are generators of (name, value)
pairs that read the next tensor only when asked:

    read_weights(config, tensors)     the checkpoint's tensors, memory-mapped and not read (a converted linear
                                      as a QuantizedWeight over its mapped bytes), and RoPE's table
    materialised(config, weights)     arrays as the forward pass uses them (float32, or float16 on request):
                                      Baichuan2's NormHead is applied here, as each float tensor is read
    quantized(weights, bits)          every linear to int8/int4 blocks (lm_head int8), the embedding float16
    bcnp.gpu.weights.device_weights   the same on a device

so `dict(quantized(materialised(config, read_weights(config, tensors)), 4))` holds one float32 tensor at a time:
the bfloat16 13B (26.5 GB) quantizes in little more memory than its quantized size.
"""
import numpy as np

from .tensor import FLOAT16_MAX, Tensor
from .forward import ROPE_INV_FREQ
from .layout import EMBEDDING, activation_bits, quantized_bits
from .quant import QuantizedWeight
from .torch_pow import rope_inv_freq_table


def read_weights(config, tensors):
    """{name: value} of a checkpoint's tensors (bcnp.checkpoint.read_model_dir): float tensors as the `Tensor`s
    they are (nothing read), a quantized pair NAME.qweight / NAME.scales as the QuantizedWeight NAME.weight over
    the mapped bytes, its x rounded as the model's bits say (an int4 checkpoint's 8-bit lm_head too); and, for RoPE
    models, the frequency table (`rope_inv_freq`)."""
    w = {}
    int4 = any(name.endswith(".qweight") and tensor.dtype != "int8" for name, tensor in tensors.items())
    for name, tensor in tensors.items():
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            in_features = config.weight_shapes()[base + ".weight"][1]
            w[base + ".weight"] = QuantizedWeight(tensor.numpy(), tensors[base + ".scales"].numpy(),
                                                  bits=8 if tensor.dtype == "int8" else 4, in_features=in_features,
                                                  x_bits=activation_bits(4 if int4 else 8))
        elif not name.endswith(".scales"):
            w[name] = tensor
    return with_rope_table(config, w)


def with_rope_table(config, w):
    """`w` with the RoPE frequency table the forward pass rotates with, for RoPE models (ALiBi needs none)."""
    if config.position_embedding == "rope":
        w[ROPE_INV_FREQ] = rope_inv_freq(config)
    return w


def rope_inv_freq(config):
    """theta^(-2k/hd) for k < hd/2, float32 (hd/2,): the checkpoint's own table when it has one (the original
    rotates with it), else the table torch's float32 pow makes (bcnp.torch_pow: a correctly rounded one moves
    the logits). A weight, not a formula in the forward pass, because these exact values are the model's."""
    table = config.rope_inv_freq
    if table is None:
        table = rope_inv_freq_table(config.rope_theta, config.head_dim)
    return np.asarray(table, dtype=np.float32)


def random_weights(config, seed=0, std=0.02, dtype=np.float32):
    """Seeded random weights in the checkpoint layout (norm weights near 1), for tests, benchmarks and the demo;
    with RoPE's table for RoPE models, so they are a complete weight dict."""
    rng = np.random.default_rng(seed)
    w = {}
    for name, shape in config.weight_shapes().items():
        if len(shape) == 1:
            w[name] = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
        else:
            w[name] = (std * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
    return with_rope_table(config, w)


# --- materialise: Tensor -> array ----------------------------------------------------------------------------------

def norm_head(weight):
    """Baichuan2's NormHead: every vocabulary row of lm_head divided by max(its L2 norm, 1e-12) (torch's
    F.normalize), in float32. The original normalises in place on its first forward; bcnp once, as it reads."""
    w = np.asarray(weight, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", w, w))[:, None]
    return w / np.maximum(norms, np.float32(1e-12))


def prepared_weight(config, name, array):
    """A float32 weight read from a checkpoint as the forward pass uses it: Baichuan2's lm_head normalised.
    The one place NormHead is applied: `materialised` (loading, moving to the GPU, quantizing) and
    bcnp.convert --quantize read float weights through it (a quantized lm_head holds normalised rows, and is not
    normalised again)."""
    return norm_head(array) if is_norm_head(config, name) else array


def is_norm_head(config, name):
    return name == "lm_head.weight" and config.family == "baichuan2"


def materialised(config, weights, dtype_of=None):
    """(name, value) of every weight, one at a time, as the forward pass uses it: a checkpoint `Tensor` is read
    now (float32 through `prepared_weight`) and its file pages handed back once the next weight is asked for;
    anything else passes as it is. `dtype_of(name)`, when given, is the float dtype each float weight must have
    (np.float16 or np.float32): tensors are read as that, arrays converted (float16 refusing values beyond its
    range). Quantized weights always pass as they are."""
    for name, value in weights.items():
        dtype = None if dtype_of is None or isinstance(value, QuantizedWeight) else np.dtype(dtype_of(name))
        if isinstance(value, Tensor):
            yield name, read_tensor(config, value, dtype)
            value.release()
        elif dtype is not None:
            yield name, as_float(name, value, dtype)
        else:
            yield name, value
        del value


def read_tensor(config, tensor, dtype=None):
    """A checkpoint tensor's values as the forward pass uses them, float32 unless `dtype` is float16."""
    if is_norm_head(config, tensor.name):
        array = prepared_weight(config, tensor.name, tensor.float32())      # |values| <= 1: float16-safe
        return array.astype(np.float16) if dtype == np.float16 else array
    return tensor.float16() if dtype == np.float16 else tensor.float32()


def as_float(name, value, dtype):
    """An array as float32 or float16; float16 refuses a finite value it would make infinite."""
    value = np.asarray(value)
    if dtype == np.float32:
        return value.astype(np.float32, copy=False)
    with np.errstate(over="ignore"):
        half = value.astype(np.float16)
    if np.isinf(half).any() and np.isfinite(value).all():
        raise ValueError(f"{name}: holds {float(np.abs(value).max()):g}, beyond float16's range (max "
                         f"{FLOAT16_MAX:g}); keep it float32 (on a GPU: to_device(model, dtype='float32'))")
    return half


# --- quantize: array -> QuantizedWeight ----------------------------------------------------------------------------

def quantized(weights, bits):
    """(name, value) pairs with every linear weight quantized to `bits` (8 or 4; lm_head always 8) and the
    embedding float16 (a lookup, not a matmul), one at a time; x rounded as `activation_bits(bits)` says. A weight
    quantized already keeps its blocks when they have the bits it would get; other bits are an error: quantizing
    again would quantize the rounding errors of the first pass."""
    if bits not in (8, 4) or isinstance(bits, bool):
        raise ValueError(f"quantize: bits must be 8 or 4, got {bits!r}")
    for name, value in weights:
        want = quantized_bits(name, bits)
        if isinstance(value, QuantizedWeight):
            if value.bits != want:
                raise ValueError(f"quantize({bits}): the model is already quantized ({name} has {value.bits} "
                                 "bits); quantize the original float model instead")
            yield name, value.with_x_bits(activation_bits(bits))
        elif want is not None:
            yield name, QuantizedWeight.from_float(value, want, name=name, x_bits=activation_bits(bits))
        elif name == EMBEDDING:
            yield name, value.astype(np.float16)
        else:
            yield name, value
        del value
