"""Block quantization (SPEC §4): GGML Q8_0 / Q4_0 to the bit, round-trip bounds, and the compiled kernels against the
NumPy specification (the matvec itself: tests/test_matvec.py)."""
import importlib
import sys
import warnings

import gguf
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from bcnp import quant
from bcnp.quant import (QuantizedWeight, dequantize, dequantize_fast, pack_nibbles, quantize, quantize_fast,
                        unpack_nibbles)
from conftest import padded, same_bits, scalar_matvec, signed_codes

SETTINGS = settings(deadline=None, max_examples=40)
GGML_TYPE = {8: gguf.GGMLQuantizationType.Q8_0, 4: gguf.GGMLQuantizationType.Q4_0}
MAX_ABS = {8: 65504.0 * 127, 4: 65504.0 * 8}      # beyond these the float16 scale overflows


# --- helpers ----------------------------------------------------------------------------------------------------

def gguf_quantize(w, bits):
    with warnings.catch_warnings():             # gguf warns on inputs it handles fine
        warnings.simplefilter("ignore")
        return gguf.quants.quantize(w, GGML_TYPE[bits])


def gguf_layout(qweight, scales, bits):
    """Our flat (qweight, scales) interleaved into GGML blocks: f16 d, then 32 int8 (Q8_0) or 16 bytes (Q4_0)."""
    rows, nb = scales.shape
    d = np.asarray(scales, np.float16).view(np.uint8).reshape(rows, nb, 2)
    q = np.asarray(qweight).view(np.uint8).reshape(rows, nb, 32 if bits == 8 else 16)
    return np.concatenate([d, q], axis=-1).reshape(rows, -1)


def block_scale(w, bits):
    """The scale d per block of w (already a multiple of 32 wide), exactly (float64: GGML's float32 d is this
    rounded, which matters only where d is a float32 subnormal -- and there the float16 scale is 0 anyway)."""
    blocks = w.reshape(w.shape[0], -1, 32).astype(np.float64)
    if bits == 8:
        return np.abs(blocks).max(-1) / 127
    first = np.abs(blocks).argmax(-1)[..., None]
    return np.take_along_axis(blocks, first, -1)[..., 0] / -8


def defined_for_ggml(w):
    """w with magnitudes below 1e-36 set to 0: below that a block's d can be under 2^-128, where 1/d overflows and
    GGML's result is undefined (the gguf package casts nan to integers)."""
    return np.where(np.abs(w) < 1e-36, np.float32(0), w).astype(np.float32)


def readonly_memmap(tmp_path, name, a):
    path = tmp_path / f"{name}.npy"
    np.save(path, a)
    m = np.load(path, mmap_mode="r")
    assert isinstance(m, np.memmap) and not m.flags.writeable
    return m


# --- strategies -------------------------------------------------------------------------------------------------

@st.composite
def weights(draw, max_rows=4, max_width=130, exponents=(-40, -30, -6, -3, 0, 2, 5)):
    """float32 (rows, width) of one magnitude 10^e: float32-subnormal, float16-underflowing, ..., large."""
    rows, width = draw(st.integers(1, max_rows)), draw(st.integers(1, max_width))
    unit = hnp.arrays(np.float32, (rows, width), elements=st.floats(-1, 1, width=32))
    return (draw(unit) * np.float32(10.0 ** draw(st.sampled_from(exponents)))).astype(np.float32)


def awkward_block(draw, bits):
    """One block of 32 where GGML's arithmetic has edges to get exactly right."""
    kind = draw(st.sampled_from(["tie", "near_tie", "rounded_tie", "negative_largest", "magnitude_tie", "zero",
                                 "float16_subnormal", "tiny", "huge", "random"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = np.float32(2.0 ** draw(st.integers(-20, 10)))
    if kind == "rounded_tie":
        # any scale: x = (k + 1/2) d rounded to float32, give or take an ulp, so x * (1/d) lands on or next to the
        # rounding point only through float32 rounding of the product (and, for Q4_0, of the + 8.5)
        largest = np.float32(rng.uniform(0.5, 2) * s * rng.choice([-1, 1]))
        d = largest / np.float32(127) if bits == 8 else largest / np.float32(-8)
        k = rng.integers(-127, 127, 32) if bits == 8 else rng.integers(-8, 8, 32)
        block = ((k + 0.5) * d).astype(np.float32)
        block = np.where(rng.random(32) < 0.5, block, np.nextafter(block, rng.choice([-np.inf, np.inf], 32)))
        block[rng.integers(32)] = largest
        if bits == 8:
            block = np.clip(block, -abs(largest), abs(largest))
    elif kind in ("tie", "near_tie"):
        if bits == 8:      # d = s exactly, x / d = k + 1/2
            block = (rng.integers(-127, 127, 32) + 0.5) * s
            block[rng.integers(32)] = 127 * s * rng.choice([-1, 1])
        else:              # d = -+s, x / d + 8.5 an integer
            block = (rng.integers(-8, 8, 32) + 0.5) * s
            block[rng.integers(32)] = -8 * s * rng.choice([-1, 1])
        block = block.astype(np.float32)
        if kind == "near_tie":
            block = np.nextafter(block, block * rng.choice([-np.inf, np.inf], 32)).astype(np.float32)
    elif kind == "negative_largest":
        block = rng.standard_normal(32).astype(np.float32) * s
        block[rng.integers(32)] = -1.5 * np.abs(block).max()
    elif kind == "magnitude_tie":      # +a and -a both largest: the first one decides Q4_0's sign
        block = rng.standard_normal(32).astype(np.float32) * s
        i, j = rng.choice(32, 2, replace=False)
        block[i], block[j] = 3 * s, -3 * s
    elif kind == "zero":
        block = np.where(rng.random(32) < 0.5, np.float32(-0.0), np.float32(0.0))
    elif kind == "float16_subnormal":  # d below 2^-14: a subnormal float16 scale
        block = rng.uniform(-1, 1, 32) * 10 ** rng.uniform(-6.5, -3.2)
    elif kind == "tiny":               # d16 = 0 while the codes are not
        block = rng.uniform(-1, 1, 32) * 10 ** rng.uniform(-35, -20)
    elif kind == "huge":               # just inside the float16 range of d
        block = rng.uniform(-1, 1, 32) * MAX_ABS[bits] * 0.999
    else:
        block = rng.standard_normal(32) * s
    return np.asarray(block, np.float32)


@st.composite
def awkward_weights(draw, bits):
    rows, nb = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    return np.stack([np.concatenate([awkward_block(draw, bits) for _ in range(nb)]) for _ in range(rows)])


# --- the build ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_weight_uses_compiled_kernels(bits, monkeypatch):
    kernels = quant._quant
    assert kernels.__file__.endswith((".so", ".pyd")), kernels.__file__
    assert kernels.SIMD in ("avx512vnni", "avx2", "scalar")
    called = []
    for name in (f"quantize_q{bits}_0", f"dequantize_q{bits}_0", f"matvec_q{bits}_0", f"matmul_q{bits}_0",
                 f"prefill_q{bits}_0"):
        def spy(*a, _f=getattr(kernels, name), _name=name, **kw):
            called.append(_name)
            return _f(*a, **kw)
        monkeypatch.setattr(kernels, name, spy)
    w = QuantizedWeight.from_float(np.ones((2, 64), np.float32), bits)
    w.matmul(np.ones((1, 64), np.float32))
    w.matmul(np.ones((3, 64), np.float32))
    w.matmul(np.ones((quant.BATCH_TOKENS + 1, 64), np.float32))
    prefill = f"prefill_q{bits}_0" if kernels.GEMM else f"dequantize_q{bits}_0"
    assert called == [f"quantize_q{bits}_0", f"matvec_q{bits}_0", f"matmul_q{bits}_0", prefill]
    assert kernels.GEMM == (kernels.SIMD in ("avx512vnni", "avx2"))            # the scalar build: BLAS


def test_missing_extension_warns_and_falls_back_to_numpy(monkeypatch):
    import bcnp
    monkeypatch.setitem(sys.modules, "bcnp._quant", None)     # what a failed build looks like to the importer
    monkeypatch.delattr(bcnp, "_quant")
    monkeypatch.setattr(bcnp, "quant", bcnp.quant)              # restored after: import_module replaces it
    monkeypatch.delitem(sys.modules, "bcnp.quant")
    with pytest.warns(RuntimeWarning, match=r"bcnp\._quant .*python setup.py build_ext --inplace"):
        fallback = importlib.import_module("bcnp.quant")
    assert fallback._quant is fallback.NumpyKernels            # tests/test_numpy_fallback.py: the same logits


def test_scale_conversion_rounds_like_numpy():
    """The kernels' own float32 -> float16 (scales) on every float16 midpoint and its neighbours."""
    h = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)    # all finite positive halves
    mid = ((h[:-1] + h[1:]) / 2).astype(np.float32)
    x = np.concatenate([mid, np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(1e9)),
                        np.float32([65504, 65519.99, 65520, 1e9, 0, 2.0**-25, 2.0**-26, 1e-45])])
    x = np.concatenate([x, -x])
    with np.errstate(over="ignore"):
        assert same_bits(quant._quant.f32_to_f16_bits(x), x.astype(np.float16).view(np.uint16))
    bits = np.arange(2**16, dtype=np.uint16)
    back = quant._quant.f16_bits_to_f32(bits)
    want = bits.view(np.float16).astype(np.float32)
    assert np.array_equal(back, want) or np.array_equal(np.isnan(back), np.isnan(want))
    finite = np.isfinite(want)
    assert same_bits(back[finite], want[finite])


# --- the format: GGML to the bit ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
@settings(deadline=None, max_examples=150)
@given(data=st.data())
def test_quantize_matches_gguf_on_awkward_blocks(bits, data):
    w = data.draw(awkward_weights(bits))
    want = gguf_quantize(w, bits)
    assert np.array_equal(gguf_layout(*quantize(w, bits), bits), want)
    assert np.array_equal(gguf_layout(*quantize_fast(w, bits), bits), want)


@pytest.mark.parametrize("bits", [8, 4])
@SETTINGS
@given(w=weights(max_width=96))
def test_quantize_and_dequantize_match_gguf(bits, w):
    w = defined_for_ggml(padded(w))
    q, s = quantize(w, bits)
    assert np.array_equal(gguf_layout(q, s, bits), gguf_quantize(w, bits))
    decoded = gguf.quants.dequantize(gguf_layout(q, s, bits), GGML_TYPE[bits])
    assert same_bits(dequantize(q, s, bits), decoded)


def test_ties_round_half_away_from_zero():
    s = np.float32(2.0**-3)
    w = np.zeros((1, 32), np.float32)
    w[0, :5] = np.float32([127, 0.5, -0.5, 2.5, -2.5]) * s              # d = s: x/d = +-0.5, +-2.5
    q, _ = quantize(w, 8)
    assert q[0, :5].tolist() == [127, 1, -1, 3, -3]
    w = np.zeros((1, 32), np.float32)
    w[0, :4] = np.float32([-8, -0.5, 0.5, 7.5]) * s                    # d = s: x/d + 8.5 = 0.5, 8, 9, 16
    codes = unpack_nibbles(quantize(w, 4)[0])
    assert codes[0, :5].tolist() == [0, 8, 9, 15, 8]                   # 16 clamps to 15; zeros code 8


def test_layout_of_a_block():
    """Q4_0 packing: byte j holds code j (low nibble) and code j + 16 (high nibble)."""
    codes = np.arange(32, dtype=np.uint8) % 16
    packed = pack_nibbles(codes[None])
    assert packed.shape == (1, 16)
    assert packed[0, 3] == (3 | (19 % 16) << 4)
    assert np.array_equal(quant._quant.pack_nibbles(codes[None]), packed)


# --- round trips ------------------------------------------------------------------------------------------------

@SETTINGS
@given(w=weights())
def test_int8_round_trip_bound(w):
    """|x - x^| <= |d|/2 per element, plus what rounding d to float16 moves (|q| <= 127 times it)."""
    q, s = quantize(w, 8)
    wp = padded(w)
    d = block_scale(wp, 8)[..., None]
    d16 = s.astype(np.float64)[..., None]
    err = np.abs(wp.astype(np.float64) - dequantize(q, s, 8)).reshape(d.shape[0], -1, 32)
    assert np.all(err <= np.abs(d) * (0.5 + 1e-5) + 127 * np.abs(d - d16) * (1 + 1e-6))


@SETTINGS
@given(w=weights())
def test_int4_round_trip_bound(w):
    """|x - x^| <= |d|/2, except where the top code 16 was clamped to 15: there <= |d|."""
    q, s = quantize(w, 4)
    wp = padded(w).astype(np.float64).reshape(w.shape[0], -1, 32)
    d = block_scale(padded(w), 4)[..., None]
    d16 = s.astype(np.float64)[..., None]
    codes = unpack_nibbles(q).reshape(wp.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        clamped = (codes == 15) & (wp / d > 7.5)
    err = np.abs(wp - dequantize(q, s, 4).reshape(wp.shape))
    assert np.all(err <= np.abs(d) * np.where(clamped, 1 + 1e-5, 0.5 + 1e-5) + 8 * np.abs(d - d16) * (1 + 1e-6))


@pytest.mark.parametrize("bits", [8, 4])
@SETTINGS
@given(w=weights())
def test_requantizing_dequantized_weights_reproduces_them(bits, w):
    q, s = quantize(w, bits)
    w_hat = dequantize(q, s, bits)
    q2, s2 = quantize(w_hat, bits)
    assert np.array_equal(dequantize(q2, s2, bits), w_hat)
    kept = s.astype(np.float32) != 0                 # a block whose scale underflowed float16 decodes to 0 and stays 0
    assert same_bits(s2[kept], s[kept])
    assert np.array_equal(signed_codes(q2, bits)[kept], signed_codes(q, bits)[kept])


@SETTINGS
@given(codes=hnp.arrays(np.uint8, st.tuples(st.integers(1, 3), st.integers(1, 4).map(lambda k: 32 * k)),
                        elements=st.integers(0, 15)),
       packed=hnp.arrays(np.uint8, st.tuples(st.integers(1, 3), st.integers(1, 4).map(lambda k: 16 * k))))
def test_pack_unpack_inverse(codes, packed):
    assert np.array_equal(unpack_nibbles(pack_nibbles(codes)), codes)
    assert np.array_equal(pack_nibbles(unpack_nibbles(packed)), packed)
    assert np.array_equal(quant._quant.pack_nibbles(codes), pack_nibbles(codes))
    assert np.array_equal(quant._quant.unpack_nibbles(packed), unpack_nibbles(packed))


def test_pack_rejects_codes_over_15():
    codes = np.zeros((1, 32), np.uint8)
    codes[0, 5] = 16
    with pytest.raises(ValueError, match="0..15"):
        pack_nibbles(codes)
    with pytest.raises(ValueError, match="0..15"):
        quant._quant.pack_nibbles(codes)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("fill", [0.0, -0.0, 1e-40, -1e-45])
def test_zero_and_vanishing_blocks_decode_to_zeros(bits, fill):
    """d = 0 (and d so small that 1/d overflows) stores a zero block: exact zeros, never nan."""
    w = np.full((2, 64), fill, np.float32)
    for q, s in (quantize(w, bits), quantize_fast(w, bits)):
        assert np.all(signed_codes(q, bits) == 0)
        for y in (dequantize(q, s, bits), dequantize_fast(q, s, bits)):
            assert np.all(y == 0) and not np.isnan(y).any()
        assert np.all(QuantizedWeight(q, s, bits).matvec(np.ones(64, np.float32)) == 0)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused(bits, bad):
    w = np.ones((3, 40), np.float32)
    w[2, 33] = bad
    for f in (quantize, quantize_fast):
        with pytest.raises(ValueError, match=r"layers\.0\.mlp\.up_proj\.weight: non-finite value .* at \[2, 33\]"):
            f(w, bits, name="layers.0.mlp.up_proj.weight")
    with pytest.raises(ValueError, match="non-finite"):
        QuantizedWeight.from_float(w, bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_weights_whose_scale_overflows_float16_are_refused(bits):
    w = np.ones((1, 32), np.float32)
    w[0, 7] = MAX_ABS[bits] * 1.01
    for f in (quantize, quantize_fast):
        with pytest.raises(ValueError, match="too large for .*float16"):
            f(w, bits, name="w")


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize(np.ones((1, 32), np.float32), 3)
    with pytest.raises(ValueError, match="2-D float"):
        quantize_fast(np.ones(32, np.float32), 8)
    q, s = quantize(np.ones((4, 64), np.float32), 4)
    with pytest.raises(ValueError, match="scales must be float16"):
        QuantizedWeight(q, s[:, :1], 4)
    with pytest.raises(ValueError, match="uint8"):
        QuantizedWeight(q.view(np.int8), s, 4)
    w = QuantizedWeight(q, s, 4, in_features=50)
    with pytest.raises(ValueError, match="input has 64 features, expected 50"):
        w.matvec(np.ones(64, np.float32))


# --- compiled == specification --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
@SETTINGS
@given(w=weights(max_rows=5, max_width=300))
def test_compiled_quantize_and_dequantize_are_bit_identical(bits, w):
    q, s = quantize(w, bits)
    qf, sf = quantize_fast(w, bits, threads=2)
    assert same_bits(qf, q) and same_bits(sf, s)
    assert same_bits(dequantize_fast(q, s, bits, w.shape[1]), dequantize(q, s, bits, w.shape[1]))
    assert same_bits(QuantizedWeight(q, s, bits, w.shape[1]).dequantize(), dequantize(q, s, bits, w.shape[1]))


@pytest.mark.parametrize("bits", [8, 4])
def test_memory_mapped_read_only_inputs(bits, tmp_path):
    w = np.random.default_rng(bits).standard_normal((37, 96)).astype(np.float32)
    q, s = quantize(w, bits)
    wm = readonly_memmap(tmp_path, "w", w)
    assert same_bits(quantize_fast(wm, bits)[0], q)
    qm, sm = readonly_memmap(tmp_path, "q", q), readonly_memmap(tmp_path, "s", s)
    assert same_bits(dequantize_fast(qm, sm, bits), dequantize(q, s, bits))
    layer = QuantizedWeight(qm, sm, bits)
    assert np.shares_memory(layer.qweight, qm) and np.shares_memory(layer.scales, sm)     # mapped, not copied
    x = np.random.default_rng(0).standard_normal((3, 96)).astype(np.float32)
    assert same_bits(layer.matvec(x[0]), QuantizedWeight(q, s, bits).matvec(x[0]))
    assert same_bits(scalar_matvec(layer, x[0]), scalar_matvec(QuantizedWeight(q, s, bits), x[0]))
    assert same_bits(layer.matmul(x), np.stack([QuantizedWeight(q, s, bits).matvec(xt) for xt in x]))
