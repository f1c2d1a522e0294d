"""The compiled attention over a float16 cache (csrc/attention.pyx) against its specification: the forward's own
`attention` on the keys and values widened to float32 (exact). Every path this build has is checked (AVX-512,
AVX2, portable C), and without the module bcnp falls back to the specification, saying so once. The module also
stores new keys and values into the cache: the bits of NumPy's clip to float16's range and cast."""
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bcnp import _attention
from bcnp.config import Config
from bcnp.forward import attention, attention_bias
from conftest import FIXTURES, MODELS


def config(heads, alibi):
    return Config(hidden_size=heads * 16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=heads,
                  vocab_size=32, max_position=4096, position_embedding="alibi" if alibi else "rope")


def case(rng, heads, T, cached, hd, spare, alibi):
    """q (nh, T, hd), a float16 cache layer (nh, S + spare, hd) and the forward's bias for T new tokens after
    `cached` ones. Keys are scaled so that scores spread over several units (a flat softmax would hide errors)."""
    S = cached + T
    q = rng.standard_normal((heads, T, hd), dtype=np.float32)
    k = (rng.standard_normal((heads, S + spare, hd)) * (3 / np.sqrt(hd))).astype(np.float16)
    v = rng.standard_normal((heads, S + spare, hd)).astype(np.float16)
    bias = attention_bias(np, config(heads, alibi), np.arange(cached, S), np.arange(S))
    return q, k, v, bias


def specification(q, k, v, bias):
    S = bias.shape[-1]
    return attention(np, q, k[:, :S].astype(np.float32), v[:, :S].astype(np.float32), bias)


def kernel(q, k, v, bias, **kwargs):
    return _attention.attend_f16(q, k.view(np.uint16), v.view(np.uint16), bias, **kwargs)


# Tolerance: out is a convex combination of values (|v| <= ~4 here), so float32 sums in another order move it by a
# few ulps of max|v| times the log of the terms; the scores' rounding (|s| <= ~10) moves each weight by ~1e-6
# relatively. Measured: at most 1.2e-6 over these shapes (S up to 600, hd up to 144); asserted 1e-5 (x8 margin).
TOLERANCE = 1e-5


@settings(max_examples=60, deadline=None)
@given(heads=st.integers(1, 9), T=st.integers(1, 6), cached=st.integers(0, 600), hd=st.sampled_from([1, 7, 8, 16,
       24, 40, 128, 144]), spare=st.integers(0, 5), alibi=st.booleans(), path=st.sampled_from(_attention.PATHS),
       threads=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_the_kernel_equals_the_specification_on_every_path(heads, T, cached, hd, spare, alibi, path, threads, seed):
    q, k, v, bias = case(np.random.default_rng(seed), heads, T, cached, hd, spare, alibi)
    want = specification(q, k, v, bias)
    got = kernel(q, k, v, bias, path=path, threads=threads)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= TOLERANCE * max(1.0, float(np.abs(v).max()))


def test_the_best_path_is_the_default_and_the_portable_one_is_always_built():
    assert _attention.PATHS[-1] == "scalar" and _attention.SIMD == _attention.PATHS[0]
    q, k, v, bias = case(np.random.default_rng(0), 4, 2, 9, 16, 0, True)
    np.testing.assert_array_equal(kernel(q, k, v, bias), kernel(q, k, v, bias, path=_attention.SIMD))


def test_strided_queries_and_bias_as_the_forward_passes_them():
    """The forward's q is a transposed slice of W_pack's output and the engine slices the bias per sequence."""
    rng = np.random.default_rng(1)
    T, heads, hd, S = 3, 5, 32, 20
    qkv = rng.standard_normal((T, 3 * heads * hd), dtype=np.float32)
    q = qkv[:, : heads * hd].reshape(T, heads, hd).transpose(1, 0, 2)                  # (nh, T, hd), strided
    _, k, v, _ = case(rng, heads, T, S - T, hd, 4, True)
    wide = attention_bias(np, config(heads, True), np.arange(S - T, S), np.arange(S + 7))
    bias = wide[:, :, :S]                                                              # not contiguous
    assert not q.flags.c_contiguous and not bias.flags.c_contiguous
    np.testing.assert_allclose(kernel(q, k, v, bias), specification(q, k, v, bias), rtol=0, atol=TOLERANCE)


def test_a_shared_bias_row_serves_every_head():
    """A RoPE model's bias is the causal mask alone, (1, T, S)."""
    q, k, v, bias = case(np.random.default_rng(2), 6, 4, 30, 16, 0, alibi=False)
    assert bias.shape[0] == 1
    np.testing.assert_allclose(kernel(q, k, v, bias), specification(q, k, v, bias), rtol=0, atol=TOLERANCE)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")      # the specification's inf - inf
@pytest.mark.parametrize("hd", [16, 128])                                # 128: AVX-512's own loops
def test_non_finite_inputs_give_what_softmax_gives(hd):
    q, k, v, bias = case(np.random.default_rng(3), 2, 1, 40, hd, 0, True)
    q[1, 0, 3] = np.nan                                                    # head 1's scores are all NaN
    for path in _attention.PATHS:
        got = kernel(q, k, v, bias, path=path)
        assert np.isfinite(got[0]).all() and np.isnan(got[1]).all()
    masked = np.full_like(bias, -np.inf)                                   # every key masked: 0/0
    assert np.isnan(kernel(q, k, v, masked)).all() and np.isnan(specification(q, k, v, masked)).all()


@pytest.mark.parametrize("hd", [16, 128])
def test_a_later_token_of_the_chunk_never_reaches_an_earlier_row(hd):
    """The bias masks each row's later keys; the kernel does not read them at all (exp(-inf) adds exactly 0), so
    a NaN key or value there, which the specification's 0 * NaN would spread to every row, stays where it is."""
    q, k, v, bias = case(np.random.default_rng(4), 3, 4, 20, hd, 0, True)  # 4 new tokens after 20
    k[:, 23], v[:, 23] = np.nan, np.nan                                    # the last new token's key and value
    for path in _attention.PATHS:
        got = kernel(q, k, v, bias, path=path)
        assert np.isnan(got[:, 3]).all()                                   # the row that sees it
        want = specification(q[:, :3], k, v, bias[:, :3, :23])             # the rows that do not, over what they see
        np.testing.assert_allclose(got[:, :3], want, rtol=0, atol=TOLERANCE)


def test_the_kernel_refuses_what_does_not_fit():
    q, k, v, bias = case(np.random.default_rng(4), 2, 2, 5, 16, 0, True)
    with pytest.raises(ValueError, match="the cache holds 7"):
        kernel(q, k, v, np.zeros((2, 2, 8), np.float32))                  # 8 positions of a 7-position cache
    with pytest.raises(ValueError, match="same heads and head_dim"):
        kernel(q[:1], k, v, bias[:1])
    with pytest.raises(ValueError, match="does not fit q"):
        kernel(q, k, v, bias[:, :1])
    with pytest.raises(ValueError, match="contiguous rows"):
        kernel(q[:, :, ::2], k[:, :, ::2].copy(), v[:, :, ::2].copy(), bias)
    with pytest.raises(ValueError, match="not in this build"):
        kernel(q, k, v, bias, path="neon")
    with pytest.raises(ValueError, match="out must be"):
        kernel(q, k, v, bias, out=np.empty((2, 2, 8), np.float32))
    out = np.empty(q.shape, np.float32)
    assert kernel(q, k, v, bias, out=out) is out


# --- storing into the cache -------------------------------------------------------------------------------------

SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.99, 65520.0, -1e30, 1e-8, 2.0**-25,
                    2.0**-24 * 1.5, 6.1e-5], np.float32)


def float32s(rng, n):
    """Any float32 bits, float16's edges and specials, and ordinary values, mixed."""
    kind = rng.integers(0, 3, n)
    return np.where(kind == 0, rng.integers(0, 2**32, n, dtype=np.uint32).view(np.float32),
                    np.where(kind == 1, rng.choice(SPECIAL, n), rng.uniform(-7e4, 7e4, n).astype(np.float32)))


@settings(max_examples=80, deadline=None)
@given(T=st.integers(1, 5), heads=st.integers(1, 6), hd=st.sampled_from([1, 7, 16, 24, 40, 128]),
       start=st.integers(0, 9), seed=st.integers(0, 2**16))
def test_the_store_writes_the_bits_of_clip_and_cast_and_nothing_else(T, heads, hd, start, seed):
    qkv = float32s(np.random.default_rng(seed), T * 3 * heads * hd).reshape(T, 3 * heads * hd)
    k = qkv[:, heads * hd:2 * heads * hd].reshape(T, heads, hd)          # a strided view, as the forward's
    cache = np.full((heads, start + T + 2, hd), 0x1234, np.uint16)
    _attention.store_f16(k, cache, start)
    with np.errstate(invalid="ignore"):
        want = k.clip(-65504, 65504).astype(np.float16).transpose(1, 0, 2)
    got = cache[:, start:start + T].view(np.float16)
    assert (np.isnan(got) == np.isnan(want)).all()
    finite = ~np.isnan(want)
    assert (got.view(np.uint16)[finite] == want.view(np.uint16)[finite]).all()
    assert (cache[:, :start] == 0x1234).all() and (cache[:, start + T:] == 0x1234).all()


def test_the_store_refuses_what_does_not_fit():
    k = np.zeros((2, 3, 8), np.float32)
    with pytest.raises(ValueError, match="does not fit the cache"):
        _attention.store_f16(k, np.zeros((4, 10, 8), np.uint16), 0)
    with pytest.raises(ValueError, match="positions 9 to 11 are outside the cache's 10"):
        _attention.store_f16(k, np.zeros((3, 10, 8), np.uint16), 9)
    with pytest.raises(ValueError, match="outside"):
        _attention.store_f16(k, np.zeros((3, 10, 8), np.uint16), -1)
    with pytest.raises(ValueError, match=r"must be \(T, heads, head_dim\)"):
        _attention.store_f16(np.zeros((3, 8), np.float32), np.zeros((3, 10, 8), np.uint16), 0)


def test_the_store_takes_any_layout():
    src = np.random.default_rng(0).standard_normal((3, 8, 2, 5), dtype=np.float32)
    for k in (src[:, :, 0, :3], src.transpose(1, 0, 3, 2)[:4, :3, 1], np.asfortranarray(src[:, :, 1, :3])):
        cache = np.zeros((k.shape[1], 6, k.shape[2]), np.uint16)
        _attention.store_f16(k, cache, 1)
        assert (cache[:, 1:1 + k.shape[0]] == k.astype(np.float16).transpose(1, 0, 2).view(np.uint16)).all()


# --- without the compiled module ---------------------------------------------------------------------------------

CHILD = """
import sys
sys.modules['bcnp._attention'] = None
import numpy as np
from bcnp import Model
model = Model.from_pretrained(sys.argv[1])
model.cache_dtype = np.dtype(np.float16)
prompt = np.load(sys.argv[2])["prompt_2"]
cache = model.new_cache()
steps = np.concatenate([model.forward(prompt[:26], cache)] + [model.forward([t], cache) for t in prompt[26:]])
np.savez(sys.argv[3], dtype=str(model.cache_dtype), logits=model.logits(prompt), steps=steps)
"""


def test_without_the_compiled_module_a_float16_cache_warns_once_and_computes_the_same_logits(tmp_path):
    fixture = FIXTURES / MODELS[0]
    result = subprocess.run([sys.executable, "-c", CHILD, fixture / "hf", fixture / "golden.npz", tmp_path / "o.npz"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1 and "bcnp._attention" in warnings[0] and "build_ext --inplace" in warnings[0], \
        result.stderr
    out = np.load(tmp_path / "o.npz")
    assert str(out["dtype"]) == "float16"
    # The kernel and its specification differ by float32 rounding, which may store a later key or value one float16
    # step apart: 1e-4 of the logits' scale, as any two computations over float16 caches (tests/test_float16_cache.py;
    # measured 2.6e-5 here). Float weights: the int8 kernels' activation grid would add steps of its own.
    from bcnp import Model
    model = Model.from_pretrained(fixture / "hf")
    model.cache_dtype = np.dtype(np.float16)
    prompt = np.load(fixture / "golden.npz")["prompt_2"]
    cache = model.new_cache()
    steps = np.concatenate([model.forward(prompt[:26], cache)] + [model.forward([t], cache) for t in prompt[26:]])
    logits = model.logits(prompt)
    scale = max(1.0, float(np.abs(logits).max()))
    assert np.abs(out["logits"] - logits).max() <= 1e-4 * scale          # the kernel and its specification
    assert np.abs(out["steps"] - steps).max() <= 1e-4 * scale            # in prefill and in decode steps
