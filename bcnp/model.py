"""The Baichuan forward pass, top to bottom, and the `Model` that holds the weights.

Every function below takes the array module `xp` (numpy or cupy) so the same lines run on the CPU and the GPU.
Weights are looked up by their checkpoint names in a mapping `w`; a linear weight is either a float array
(out_features, in_features) or a `bcnp.quant.QuantizedWeight`, and `linear` hides the difference.

Shapes: T new tokens, S = tokens in the cache after appending them, H hidden, nh heads, hd head_dim.
"""
import functools
import math
import mmap
import numbers
import os
from dataclasses import dataclass

import warnings

import numpy as np

from .config import Config
from .errors import one_line
from .quant import QuantizedWeight, _compiled, quantized_bits


# --- the building blocks ---------------------------------------------------------------------------------------

def rms_norm(xp, x, weight, eps):
    # x * rsqrt(mean(x^2) + eps) * w, in float32 like the original
    variance = xp.mean(x * x, axis=-1, keepdims=True)
    return x * (1.0 / xp.sqrt(variance + eps)) * weight


def linear(x, w):
    """x @ w.T for x (T, in) and w (out, in); a quantized weight multiplies with its own kernels."""
    if isinstance(w, QuantizedWeight):
        return w.matmul(x)
    return x @ w.T


def silu(xp, x):
    return x / (1.0 + xp.exp(-x))


def swiglu_mlp(xp, x, w, p):
    """down_proj(silu(gate_proj(x)) * up_proj(x))."""
    gate = linear(x, w[p + "mlp.gate_proj.weight"])
    up = linear(x, w[p + "mlp.up_proj.weight"])
    return linear(silu(xp, gate) * up, w[p + "mlp.down_proj.weight"])


def alibi_slopes(n_heads):
    """The original `_get_interleave(n)`: a geometric sequence 2^(-8/n)^(i+1) for a power of two, else the
    sequence of the power of two below n followed by every other slope of the one above (40 heads: 32 + 8)."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_2(n_heads)
    p = 2 ** math.floor(math.log2(n_heads))
    return power_of_2(p) + power_of_2(2 * p)[0::2][: n_heads - p]


def attention_bias(xp, config, q_pos, k_pos):
    """Additive score bias (nh or 1, T, S): the causal mask, plus ALiBi for 13B.

    The original adds slope·j; slope·(j - i) gives the same softmax (the row shift cancels) and stays small at
    long contexts, where slope·j would cost float32 precision."""
    distance = (k_pos[None, :] - q_pos[:, None]).astype(xp.float32)         # (T, S), j - i
    causal = xp.where(distance > 0, xp.float32(-xp.inf), xp.float32(0.0))   # future keys masked
    if config.position_embedding != "alibi":
        return causal[None]
    slopes = alibi_slopes_on(xp, config.num_attention_heads)
    return slopes[:, None, None] * distance[None] + causal[None]


@functools.lru_cache(maxsize=None)
def alibi_slopes_on(xp, n_heads):
    # copied to the array module's device once: a host-to-device copy per token would make the GPU wait for
    # the host, and a CUDA graph (bcnp.backend) cannot record one
    return xp.asarray(alibi_slopes(n_heads), dtype=xp.float32)


def rope_inv_freq(xp, config):
    """theta^(-2k/hd) for k < hd/2: the checkpoint's own table when it has one (the original rotates with it),
    else the table torch's float32 pow makes (bcnp.torch_pow: a correctly rounded one moves the logits)."""
    if config.rope_inv_freq is not None:
        return rope_table_on(xp, config.rope_inv_freq)
    return rope_inv_freq_computed(xp, config)


def rope_inv_freq_computed(xp, config):
    from .torch_pow import rope_inv_freq_table
    return rope_table_on(xp, rope_inv_freq_table(config.rope_theta, config.head_dim))


@functools.lru_cache(maxsize=None)
def rope_table_on(xp, table):
    # on the device once, as alibi_slopes_on: no host-to-device copy per token
    return xp.asarray(table, dtype=xp.float32)


def rope(xp, x, positions, inv_freq):
    """Rotary embedding, `rotate_half` style: (x1, x2) -> x·cos + (-x2, x1)·sin, x (T, nh, hd)."""
    freqs = positions.astype(xp.float32)[:, None] * inv_freq[None, :]        # (T, hd/2)
    emb = xp.concatenate([freqs, freqs], axis=-1)[:, None, :]                # (T, 1, hd)
    half = x.shape[-1] // 2
    rotated = xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * xp.cos(emb) + rotated * xp.sin(emb)


def softmax(xp, x):
    e = xp.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention(xp, q, k, v, bias):
    """softmax(q·kᵀ/√hd + bias)·v per head; q (nh, T, hd), k and v (nh, S, hd) -> (nh, T, hd)."""
    scores = (q @ k.transpose(0, 2, 1)) / math.sqrt(q.shape[-1]) + bias      # (nh, T, S)
    return softmax(xp, scores) @ v


# --- the KV cache ----------------------------------------------------------------------------------------------

# Attention over a float16 cache on the CPU reads it as stored, in bcnp._attention (csrc/attention.pyx); without
# that module it runs the specification (`attention` on the keys and values widened to float32), saying so once.
_attention, _attention_error = _compiled("_attention")
if _attention_error is not None:
    warnings.warn(one_line(f"bcnp._attention (compiled from csrc/) could not be loaded ({_attention_error}); a float16 "
                           "KV cache attends in NumPy instead, widening the cache to float32 at every step: build it "
                           "with `python setup.py build_ext --inplace` or `pip install -e .`"), RuntimeWarning,
                  stacklevel=2)

FLOAT16_MAX = 65504.0
CACHE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


@dataclass
class KVCache:
    """Keys and values of every layer for positions [0, length), preallocated for the whole context.

    Layout (layers, nh, max_len, hd), as in the original, so each head's keys are contiguous. On the CPU
    np.zeros maps untouched pages lazily: a 4096-token 13B cache costs memory only as it fills.
    A step of T new tokens: `positions` says where they go, each layer `store`s their keys and values and
    `attend`s over the first `span` positions, then `length` grows by T.

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

    def store(self, i, k, v):
        """Layer i's keys and values (T, nh, hd) of the new tokens."""
        start, end = self.length, self.length + k.shape[0]
        if self.k.dtype == np.float16:
            k, v = k.clip(-FLOAT16_MAX, FLOAT16_MAX), v.clip(-FLOAT16_MAX, FLOAT16_MAX)
        self.k[i, :, start:end] = k.transpose(1, 0, 2)                      # (nh, T, hd)
        self.v[i, :, start:end] = v.transpose(1, 0, 2)

    def attend(self, xp, i, q, bias):
        """Attention of q (nh, T, hd) over layer i's first S = bias.shape[-1] positions -> (nh, T, hd)."""
        S = bias.shape[-1]
        if xp is np and self.k.dtype == np.float16 and _attention is not None:
            # The kernel for any T: a prefill chunk of 16-256 tokens at 13B width attended 1.2-2.5x faster through
            # it than widening the span to float32 for BLAS (tools/memory_bench.py attention), and it never
            # holds the (nh, T, S) scores.
            return _attention.attend_f16(q, self.k[i].view(np.uint16), self.v[i].view(np.uint16), bias)
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


# --- the transformer ---------------------------------------------------------------------------------------------

def decoder_layer(xp, x, w, i, config, cache, positions, bias, inv_freq):
    """One pre-norm block: x + attention(rms_norm(x)), then x + mlp(rms_norm(x)). x (T, H)."""
    p = f"model.layers.{i}."
    T, H, nh, hd = x.shape[0], config.hidden_size, config.num_attention_heads, config.head_dim

    h = rms_norm(xp, x, w[p + "input_layernorm.weight"], config.rms_norm_eps)
    qkv = linear(h, w[p + "self_attn.W_pack.weight"])                       # (T, 3H): rows of W_pack are q | k | v
    q, k, v = (qkv[:, j * H:(j + 1) * H].reshape(T, nh, hd) for j in range(3))
    if inv_freq is not None:
        q, k = rope(xp, q, positions, inv_freq), rope(xp, k, positions, inv_freq)

    cache.store(i, k, v)
    out = cache.attend(xp, i, q.transpose(1, 0, 2), bias)                   # (nh, T, hd)
    x = x + linear(out.transpose(1, 0, 2).reshape(T, H), w[p + "self_attn.o_proj.weight"])

    h = rms_norm(xp, x, w[p + "post_attention_layernorm.weight"], config.rms_norm_eps)
    return x + swiglu_mlp(xp, h, w, p)


def transformer(xp, w, config, ids, cache, hidden=None, last_only=False, layer=decoder_layer, rows=None):
    """Token ids (T,) -> logits (T, V) (or (1, V) with last_only), appending T positions to the cache.

    `rows` (indices) asks for the logits of those positions only (generation needs each sequence's last).
    `hidden`, when a list, receives the embedding output, each layer's input and the final norm's output.
    `layer` computes one block (the GPU's one-token decode passes bcnp.backend.decode_layer, fused kernels)."""
    T = len(ids)
    positions = cache.positions(xp, T)                                      # (T,)
    bias = attention_bias(xp, config, positions, xp.arange(cache.span(T)))  # (nh or 1, T, S)
    inv_freq = rope_inv_freq(xp, config) if config.position_embedding == "rope" else None

    x = w["model.embed_tokens.weight"][xp.asarray(ids)].astype(xp.float32)  # (T, H)
    for i in range(config.num_hidden_layers):
        if hidden is not None:
            hidden.append(x)
        x = layer(xp, x, w, i, config, cache, positions, bias, inv_freq)
    cache.length += T

    x = rms_norm(xp, x, w["model.norm.weight"], config.rms_norm_eps)
    if hidden is not None:
        hidden.append(x)
    if last_only:
        x = x[-1:]
    elif rows is not None:
        x = x[xp.asarray(rows)]
    return linear(x, w["lm_head.weight"])                                   # (T, V)


# --- the model: weights, cache and generation around `transformer` ---------------------------------------------

def to_numpy(a):
    """Host NumPy from either array module (cupy arrays have .get())."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


def random_weights(config, seed=0, std=0.02, dtype=np.float32):
    """Seeded random weights in the checkpoint layout (norm weights near 1), for tests, benchmarks and the demo."""
    rng = np.random.default_rng(seed)
    w = {}
    for name, shape in config.weight_shapes().items():
        if len(shape) == 1:
            w[name] = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
        else:
            w[name] = (std * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
    return w


def norm_head(weight):
    """Baichuan2's NormHead: every vocabulary row of lm_head divided by max(its L2 norm, 1e-12) (torch's
    F.normalize), in float32. The original normalises in place on its first forward; bcnp once, as it reads."""
    w = np.asarray(weight, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", w, w))[:, None]
    return w / np.maximum(norms, np.float32(1e-12))


def prepared_weight(config, name, array):
    """A float32 weight read from a checkpoint as the forward pass uses it: Baichuan2's lm_head normalised.
    The one place NormHead is applied: loading, moving to the GPU, quantizing and bcnp.convert --quantize all
    read float weights through it (a quantized lm_head holds normalised rows, and is not normalised again)."""
    return norm_head(array) if is_norm_head(config, name) else array


def is_norm_head(config, name):
    return name == "lm_head.weight" and config.family == "baichuan2"


class CheckpointWeights(dict):
    """Weights straight from a checkpoint: memory-mapped, converted to float32 the first time they are used.

    Opening the real 13B (26.5 GB of bfloat16) must not materialise it, so conversion waits for use;
    `Model.quantize` reads each tensor once through `read_once(name)` without keeping the float copy.
    Every read goes through `prepared_weight` (NormHead)."""

    def __init__(self, tensors, config):
        super().__init__()
        self.tensors, self.config = tensors, config

    def tensor(self, name):
        return self.tensors[name]

    def read(self, name, float16=False):
        """A weight's float32 (or float16) values as the forward pass uses them, not kept here."""
        if is_norm_head(self.config, name):
            array = prepared_weight(self.config, name, self.tensors[name].float32())   # |values| <= 1: float16-safe
            return array.astype(np.float16) if float16 else array
        return self.tensors[name].float16() if float16 else self.tensors[name].float32()

    def read_once(self, name):
        """A float32 copy of a weight not kept here, its file pages handed back: for going one tensor at a time."""
        array = self.read(name)
        self.tensors[name].release()
        return array

    def __missing__(self, name):
        self[name] = array = self.read(name)
        return array

    def names(self):
        """Every weight name: those still in the checkpoint and those already set (quantized on disk)."""
        return list(dict.fromkeys([*self.tensors, *self]))


FORWARD_CHUNK = 256           # tokens per pass of Model.forward (the engine's prefill_chunk)


def default_cache_dtype(w):
    """float16 for a quantized model (at long contexts its decode reads the cache as much as the weights; the
    logits move by <= 3.5e-4 of their scale, tests/test_float16_cache.py), float32 for a float one (the reference:
    the golden logits)."""
    quantized = any(isinstance(value, QuantizedWeight) for value in w.values())
    return np.dtype(np.float16 if quantized else np.float32)


class Model:
    """Baichuan-13B / 7B: `config`, the weights `w` (by checkpoint name), the array module `xp`."""

    def __init__(self, config, w, xp=np, tokenizer=None, generation_config=None, path=None, cache_dtype=None):
        from .sampling import GenerationConfig
        self.config, self.w, self.xp = config, w, xp
        self.cache_dtype = default_cache_dtype(w) if cache_dtype is None else np.dtype(cache_dtype)
        self.tokenizer = tokenizer
        self.generation_config = generation_config or GenerationConfig()
        self.path = path

    # --- loading ---

    @classmethod
    def from_pretrained(cls, path, family=None):
        """A Hugging Face directory (.bin or .safetensors shards) or one written by `python -m bcnp.convert`.
        family: "baichuan" or "baichuan2" (NormHead), overriding what the vocabulary or the bcnp section says."""
        from .checkpoint import read_model_dir
        from .sampling import GenerationConfig

        path = os.fspath(path)
        config, _, tensors = read_model_dir(path, family=family)
        # float tensors stay in the checkpoint until used; quantized ones are wrapped as they lie on disk
        w = CheckpointWeights({n: t for n, t in tensors.items() if not n.endswith((".qweight", ".scales"))}, config)
        for name in tensors:
            if name.endswith(".qweight"):
                base = name[: -len(".qweight")]
                out_features, in_features = config.weight_shapes()[base + ".weight"]
                w[base + ".weight"] = QuantizedWeight(tensors[name].numpy(), tensors[base + ".scales"].numpy(),
                                                      bits=8 if tensors[name].dtype == "int8" else 4,
                                                      in_features=in_features)
        tokenizer = None
        if os.path.exists(os.path.join(path, "tokenizer.model")):
            from .tokenizer import Tokenizer
            tokenizer = Tokenizer(os.path.join(path, "tokenizer.model"))
        return cls(config, w, np, tokenizer, GenerationConfig.from_json(path, config.vocab_size), path)

    def _with_weights(self, w, xp):
        return Model(self.config, w, xp, self.tokenizer, self.generation_config, self.path)

    def quantize(self, bits):
        """Every linear weight to `bits` (8 or 4; lm_head always 8), the embedding to float16; one tensor at a
        time, so a bfloat16 13B quantizes in little more memory than its quantized size."""
        if bits not in (8, 4) or isinstance(bits, bool):
            raise ValueError(f"quantize: bits must be 8 or 4, got {bits!r}")
        if self.xp is not np:
            raise ValueError("quantize on the CPU, then move: model.quantize(8).cuda()")
        names = self.w.names() if isinstance(self.w, CheckpointWeights) else list(self.w)
        self._check_not_quantized_otherwise(names, bits)
        quantized = {}
        for name in names:
            if isinstance(self.w, CheckpointWeights) and name not in self.w:
                array = self.w.read_once(name)
            else:
                array = self.w[name]
            if isinstance(array, QuantizedWeight) or quantized_bits(name, bits) is None:
                quantized[name] = array.astype(np.float16) if name == "model.embed_tokens.weight" else array
            else:
                quantized[name] = QuantizedWeight.from_float(array, quantized_bits(name, bits), name=name)
        return self._with_weights(quantized, np)

    def _check_not_quantized_otherwise(self, names, bits):
        """Quantizing again to the same bits changes nothing; to other bits it would quantize the rounding errors
        of the first pass (and used to keep the first bits silently)."""
        for name in names:
            weight = self.w.get(name)                 # .get: a CheckpointWeights does not convert on .get
            if isinstance(weight, QuantizedWeight) and weight.bits != quantized_bits(name, bits):
                raise ValueError(f"quantize({bits}): the model is already quantized ({name} has {weight.bits} bits); "
                                 "quantize the original float model instead")

    def cuda(self):
        from .backend import to_device
        return to_device(self)

    def cpu(self):
        from .backend import to_host
        return to_host(self)

    # --- running ---

    def new_cache(self, max_len=None):
        """An empty cache for `max_len` positions (default: the whole context)."""
        return new_cache(self.xp, self.config, max_len, self.cache_dtype)

    def forward(self, ids, cache):
        """Logits (T_new, V) for `ids` appended after what `cache` holds; always host float32. A long `ids` goes
        through the cache FORWARD_CHUNK tokens at a time, as the engine's prefill does: one pass over 4000 tokens of
        the 13B would hold (40, 4000, 4000) float32 biases and scores, 2.6 GB each (2 int4 layers peaked at 11.2 GB,
        issue 12; chunked: 2.8 GB, 1 GB of it the logits, tools/memory_bench.py memory)."""
        ids = self._check_ids(ids)
        if len(ids) <= FORWARD_CHUNK:
            return to_numpy(transformer(self.xp, self.w, self.config, ids, cache))
        logits = np.empty((len(ids), self.config.vocab_size), np.float32)          # filled in place: no 2nd copy
        for start in range(0, len(ids), FORWARD_CHUNK):
            chunk = ids[start:start + FORWARD_CHUNK]
            logits[start:start + len(chunk)] = to_numpy(transformer(self.xp, self.w, self.config, chunk, cache))
        return logits

    def logits(self, ids):
        """Logits (T, V) of one full forward pass with a fresh cache."""
        ids = self._check_ids(ids)
        return self.forward(ids, self.new_cache(len(ids)))

    def hidden_states(self, ids):
        """(L + 1, T, H): the embedding output, each layer's input, the final norm's output."""
        ids = self._check_ids(ids)
        hidden = []
        transformer(self.xp, self.w, self.config, ids, self.new_cache(len(ids)), hidden=hidden)
        return np.stack([to_numpy(h) for h in hidden])

    def next_logits(self, ids, cache):
        """Host float32 logits (V,) of the last of `ids`, appended to `cache`: one step of generation."""
        ids = self._check_ids(ids)
        return to_numpy(transformer(self.xp, self.w, self.config, ids, cache, last_only=True))[0]

    def _check_ids(self, ids):
        if isinstance(ids, (str, bytes)):
            raise ValueError(f"token ids must be a sequence of integers, got {type(ids).__name__} (encode text with "
                             "model.tokenizer.encode first)")
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token ids must be a non-empty 1-D sequence of integers, got shape {ids.shape} "
                             f"dtype {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got {ids.min()}..{ids.max()}")
        return ids.astype(np.int64)

    def generate(self, ids, max_new_tokens=None, temperature=None, top_k=None, top_p=None,
                 repetition_penalty=None, do_sample=None, seed=None):
        """An iterator of new token ids; it stops at eos (not yielded), max_new_tokens or a full context.
        Unset arguments come from the checkpoint's generation_config.json. Everything is checked here, before
        the first token; a step whose logits are not finite (NaN or infinity) stops it with a ValueError.
        It runs on the model's engine: the longest prefix of `ids` already in a cache (the previous chat turn)
        is not computed again."""
        from .sampling import check_sampling_args, check_setting
        g = self.generation_config
        max_new_tokens = g.max_new_tokens if max_new_tokens is None else max_new_tokens
        settings = dict(temperature=g.temperature if temperature is None else temperature,
                        top_k=g.top_k if top_k is None else top_k,
                        top_p=g.top_p if top_p is None else top_p,
                        repetition_penalty=g.repetition_penalty if repetition_penalty is None else repetition_penalty,
                        do_sample=g.do_sample if do_sample is None else do_sample)
        check_setting("max_new_tokens", max_new_tokens)
        check_sampling_args(**settings)
        if seed is not None and not (isinstance(seed, numbers.Integral) and seed >= 0):
            raise ValueError(f"seed must be an integer >= 0, got {seed!r:.60}")
        engine = self.engine()
        return engine.stream(engine.submit(ids, max_new_tokens=max_new_tokens, seed=seed, **settings))

    def engine(self):
        """This model's engine (bcnp.engine), made on first use: one sequence per `generate` call, and the caches
        of finished ones kept, so a chat turn that extends the previous one computes only its new tokens."""
        if getattr(self, "_engine", None) is None:
            from .engine import Engine
            self._engine = Engine(self, keep_cached=1)          # one conversation: its last turn's cache
        return self._engine

    # --- chat ---

    def build_chat_input(self, messages, max_new_tokens=0):
        from .chat import build_chat_input
        g = self.generation_config
        return build_chat_input(self._require_tokenizer(), messages, model_max_length=self.config.max_position,
                                max_new_tokens=max_new_tokens, generation_max_new_tokens=g.max_new_tokens,
                                user_token_id=g.user_token_id, assistant_token_id=g.assistant_token_id)

    def chat_prompt(self, messages, max_new_tokens=None):
        """(token ids, reply budget) of `messages` by the chat's one policy (bcnp.chat.chat_prompt)."""
        from .chat import chat_prompt
        g = self.generation_config
        return chat_prompt(self._require_tokenizer(), messages, context=self.config.max_position,
                           max_new_tokens=max_new_tokens, generation_max_new_tokens=g.max_new_tokens,
                           user_token_id=g.user_token_id, assistant_token_id=g.assistant_token_id)

    def __call__(self, messages, stream=False, **generate_kwargs):
        """The seed's chat API: {'response': text, 'history': messages + [reply]}, or with stream=True an
        iterator of text pieces as they are produced."""
        pieces = self._chat_stream(messages, generate_kwargs)
        if stream:
            return pieces
        response = "".join(pieces)
        return {"response": response, "history": list(messages) + [{"role": "assistant", "content": response}]}

    def _chat_stream(self, messages, generate_kwargs):
        from .tokenizer import StreamDecoder
        ids, budget = self.chat_prompt(messages, generate_kwargs.get("max_new_tokens"))
        decoder = StreamDecoder(self._require_tokenizer())
        for token in self.generate(ids, **{**generate_kwargs, "max_new_tokens": budget}):
            text = decoder.put(token)
            if text:
                yield text
        text = decoder.end()
        if text:
            yield text

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"{self.path or 'this model'}: no tokenizer.model in the model directory")
        return self.tokenizer
