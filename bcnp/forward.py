"""The Baichuan forward pass, top to bottom: math only.

Every function takes the array module `xp` (numpy or cupy) so the same lines run on the CPU and the GPU.
Weights are looked up by their checkpoint names in a plain dict `w` (bcnp.weights makes it). A linear weight is
either an array (out_features, in_features) or an object that multiplies with its own kernels (`.matmul(x)`:
bcnp.quant.QuantizedWeight, bcnp.gpu.weights.DeviceQuantizedWeight); `linear` hides the difference. RoPE's
frequency table is in `w` too, as the original keeps it in the model (`rotary_emb.inv_freq`, a buffer): its
values are those of torch's float32 pow, which bcnp.weights reproduces, not a formula to evaluate here.

`decoder_layer` computes with `ops` (`Ops`: rms_norm, linear, add_linear, swiglu): the GPU's one-token decode
passes its own (bcnp.gpu.ops.DecodeOps: fused kernels) to this same function.

Shapes: T new tokens, S = tokens in the cache after appending them, H hidden, nh heads, hd head_dim, I the MLP's
intermediate size, V the vocabulary.
"""
import functools
import math

ROPE_INV_FREQ = "model.rotary_emb.inv_freq"     # (hd/2,) float32, in `w` of RoPE models only


# --- the building blocks ---------------------------------------------------------------------------------------

def rms_norm(xp, x, weight, eps):
    # x * rsqrt(mean(x^2) + eps) * w, in float32 like the original
    variance = xp.mean(x * x, axis=-1, keepdims=True)
    return x * (1.0 / xp.sqrt(variance + eps)) * weight


def linear(x, w):
    """x @ w.T for x (T, in) and w (out, in); a kernel-backed weight (one with `.matmul`) multiplies itself."""
    if hasattr(w, "matmul") and not hasattr(w, "ndim"):        # (an array multiplies by `@`, never by .matmul)
        return w.matmul(x)
    # (w @ xᵀ)ᵀ rather than x @ wᵀ: the same products, but OpenBLAS then streams w instead of packing it, 1.2-1.7x
    # faster for 1-128 tokens at 13B width (13696 x 5120 float32, 2 threads) and no slower at 256-512
    return (w @ x.T).T


def silu(xp, x):
    return x / (1.0 + xp.exp(-x))


def swiglu(xp, h, gate, up):
    """silu(gate_proj(h)) * up_proj(h): (T, I)."""
    return silu(xp, linear(h, gate)) * linear(h, up)


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
    # the host, and a CUDA graph (bcnp.gpu.graphs) cannot record one
    return xp.asarray(alibi_slopes(n_heads), dtype=xp.float32)


def rope(xp, x, positions, inv_freq):
    """Rotary embedding, `rotate_half` style: (x1, x2) -> x·cos + (-x2, x1)·sin, x (T, nh, hd)."""
    freqs = positions.astype(xp.float32)[:, None] * inv_freq[None, :]        # (T, hd/2)
    emb = xp.concatenate([freqs, freqs], axis=-1)[:, None, :]                # (T, 1, hd)
    half = x.shape[-1] // 2
    rotated = xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * xp.cos(emb) + rotated * xp.sin(emb)


def softmax(xp, x):
    x = x - x.max(axis=-1, keepdims=True)
    # A score 80 below its row's max weighs < 2e-35 against a row sum >= 1, nothing in float32, but its exp (below
    # -87: a subnormal) and its products with v are near-subnormal numbers, which x86 computes many times slower:
    # ALiBi's far keys land there. Dropped, the same outputs (max difference 0.0), and one 13B layer's attention
    # at 2000 positions takes 6.0 ms instead of 7.3-11.3 (tools/bench.py, "one layer's attention alone").
    e = xp.exp(xp.where(x < -80.0, xp.float32(-xp.inf), x))
    return e / e.sum(axis=-1, keepdims=True)


def attention(xp, q, k, v, bias):
    """softmax(q·kᵀ/√hd + bias)·v per head; q (nh, T, hd), k and v (nh, S, hd) -> (nh, T, hd)."""
    scores = (q @ k.transpose(0, 2, 1)) / math.sqrt(q.shape[-1]) + bias      # (nh, T, S)
    return softmax(xp, scores) @ v


class Ops:
    """The operations a decoder layer is made of, as plain array code. Each method looks its function up when
    called, so the functions above are the definition; bcnp.gpu.ops.DecodeOps overrides them with kernels."""

    def rms_norm(self, xp, x, weight, eps):
        return rms_norm(xp, x, weight, eps)

    def linear(self, x, w):
        return linear(x, w)

    def add_linear(self, x, a, w):
        """x + a @ w.T: a residual update."""
        return x + linear(a, w)

    def swiglu(self, xp, h, gate, up):
        return swiglu(xp, h, gate, up)


PLAIN = Ops()


# --- the transformer ---------------------------------------------------------------------------------------------

def decoder_layer(xp, x, w, i, config, cache, positions, bias, ops=PLAIN):
    """One pre-norm block: x + attention(rms_norm(x)), then x + mlp(rms_norm(x)). x (T, H).
    `cache` stores the new keys and values and attends over its positions (bcnp.cache.KVCache)."""
    p = f"model.layers.{i}."
    T, H, nh, hd, eps = x.shape[0], config.hidden_size, config.num_attention_heads, config.head_dim, config.rms_norm_eps

    h = ops.rms_norm(xp, x, w[p + "input_layernorm.weight"], eps)
    qkv = ops.linear(h, w[p + "self_attn.W_pack.weight"])                   # (T, 3H): rows of W_pack are q | k | v
    q, k, v = (qkv[:, j * H:(j + 1) * H].reshape(T, nh, hd) for j in range(3))
    if config.position_embedding == "rope":
        q, k = rope(xp, q, positions, w[ROPE_INV_FREQ]), rope(xp, k, positions, w[ROPE_INV_FREQ])

    cache.store(i, k, v)
    out = cache.attend(xp, i, q.transpose(1, 0, 2), bias)                   # (nh, T, hd)
    x = ops.add_linear(x, out.transpose(1, 0, 2).reshape(T, H), w[p + "self_attn.o_proj.weight"])

    h = ops.rms_norm(xp, x, w[p + "post_attention_layernorm.weight"], eps)
    mlp = ops.swiglu(xp, h, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"])     # (T, I)
    return ops.add_linear(x, mlp, w[p + "mlp.down_proj.weight"])


def transformer(xp, w, config, ids, cache, hidden=None, last_only=False, rows=None, ops=PLAIN):
    """Token ids (T,) -> logits (T, V) (or (1, V) with last_only), appending T positions to the cache.

    `rows` (indices) asks for the logits of those positions only (generation needs each sequence's last).
    `hidden`, when a list, receives the embedding output, each layer's input and the final norm's output.
    `ops` is what the layers compute with (the GPU's one-token decode passes fused kernels)."""
    T = len(ids)
    positions = cache.positions(xp, T)                                      # (T,)
    bias = attention_bias(xp, config, positions, xp.arange(cache.span(T)))  # (nh or 1, T, S)

    x = w["model.embed_tokens.weight"][xp.asarray(ids)].astype(xp.float32)  # (T, H)
    for i in range(config.num_hidden_layers):
        if hidden is not None:
            hidden.append(x)
        x = decoder_layer(xp, x, w, i, config, cache, positions, bias, ops)
    cache.advance(T)

    x = rms_norm(xp, x, w["model.norm.weight"], config.rms_norm_eps)
    if hidden is not None:
        hidden.append(x)
    if last_only:
        x = x[-1:]
    elif rows is not None:
        x = x[xp.asarray(rows)]
    return linear(x, w["lm_head.weight"])                                   # (T, V)
