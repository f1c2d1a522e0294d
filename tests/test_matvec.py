"""The fused decode matvec (QuantizedWeight.matvec: the activation rounded per block, to int16 or int8 for 8-bit
weights (x_bits) and int8 for 4-bit ones, exact integer block sums) within its documented bound of the float
product, exact where every float step is, on padded rows and non-finite inputs; the BLAS fallback and the thread
count, and the OpenMP threads a thread keeps."""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bcnp import quant
from bcnp.quant import ACTIVATION_LIMIT, QuantizedWeight, dequantize, quantize, rounded_activation
from conftest import WEIGHT_KINDS, matvec_bound, padded, same_bits, scalar_matvec


# --- padding: rows not a multiple of 32 -------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, x_bits", WEIGHT_KINDS)
@pytest.mark.parametrize("width", [1, 20, 33, 100])
def test_padding_decodes_to_zero_and_kernels_ignore_it(bits, x_bits, width):
    rng = np.random.default_rng(width)
    w = rng.standard_normal((5, width)).astype(np.float32)
    q, s = quantize(w, bits)
    assert q.shape == (5, -(-width // 32) * 32 // (1 if bits == 8 else 2))
    full = dequantize(q, s, bits)
    assert np.all(full[:, width:] == 0) and same_bits(full[:, :width], dequantize(q, s, bits, width))
    layer = QuantizedWeight.from_float(w, bits, x_bits=x_bits)
    assert layer.shape == (5, width)
    # the same weight written out with explicit zero columns gives the same products
    wide = QuantizedWeight.from_float(padded(w), bits, x_bits=x_bits)
    x = rng.standard_normal((4, width)).astype(np.float32)
    xp = padded(x)
    assert same_bits(layer.matvec(x[0]), wide.matvec(xp[0]))
    assert same_bits(scalar_matvec(layer, x[0]), scalar_matvec(wide, xp[0]))
    assert same_bits(layer.matmul(x), wide.matmul(xp))
    want = x.astype(np.float64) @ dequantize(q, s, bits, width).T.astype(np.float64)
    assert all(np.all(np.abs(y - want[t]) <= matvec_bound(q, s, bits, x[t], x_bits)[0])
               for t, y in enumerate(layer.matmul(x)))


# --- the decode matvec and the prefill matmul ----------------------------------------------------------------------------

@st.composite
def layer_and_input(draw, bits, x_bits):
    # n_blocks covers the SIMD chunking: groups of 2 / 4 blocks, chunks of 8 / 16, and every tail
    rows, nb = draw(st.integers(1, 9)), draw(st.integers(1, 40))
    width = 32 * nb - draw(st.integers(0, 31))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, width)) * 10.0 ** rng.uniform(-3, 1, (rows, 1))).astype(np.float32)
    x = (rng.standard_normal(width) * 10.0 ** rng.uniform(-2, 2, width)).astype(np.float32)
    x[rng.random(width) < 0.1] = 0
    return QuantizedWeight.from_float(w, bits, x_bits=x_bits), x


@pytest.mark.parametrize("bits, x_bits", WEIGHT_KINDS)
@settings(deadline=None, max_examples=80)
@given(data=st.data())
def test_matvec_within_its_bound_of_the_float_product(bits, x_bits, data):
    layer, x = data.draw(layer_and_input(bits, x_bits))
    want = dequantize(layer.qweight, layer.scales, bits, layer.in_features).astype(np.float64) @ x
    got = layer.matvec(x)
    assert got.dtype == np.float32 and got.shape == (layer.out_features,)
    bound, rounding = matvec_bound(layer.qweight, layer.scales, bits, x, x_bits)
    assert np.all(np.abs(got - want) <= bound)
    # the SIMD kernel adds the same integer block products as the portable one, only in another order
    assert np.all(np.abs(got - scalar_matvec(layer, x)) <= 2 * rounding)
    assert np.all(np.abs(scalar_matvec(layer, x) - want) <= bound)
    assert same_bits(layer.matvec(x, threads=1), layer.matvec(x, threads=2))
    assert same_bits(layer.matmul(x[None])[0], got)


def test_int8_matvec_error_is_float32_sized():
    """8-bit weights meet x rounded to int16: at 13B width the bound is a few 2^-24 of sum |W^| |x|, 256 times
    tighter than with llama.cpp's int8 x."""
    rng = np.random.default_rng(8)
    layer = QuantizedWeight.from_float(rng.standard_normal((64, 5120)).astype(np.float32), 8)
    x = rng.standard_normal(5120).astype(np.float32)
    w_hat = layer.dequantize().astype(np.float64)
    scale = np.abs(w_hat) @ np.abs(x)
    assert np.all(np.abs(layer.matvec(x) - w_hat @ x) <= 2.0**-16 * scale)
    assert np.all(matvec_bound(layer.qweight, layer.scales, 8, x)[0] <= 2.0**-9 * scale)


def test_int4_matvec_error_is_a_sixteenth_of_the_weights_own():
    """4-bit weights meet x rounded to int8 (llama.cpp's choice): the error that adds is about 1/16 of what rounding
    the weights to 4 bits already costs (RMS over the rows, 13B width: 0.063 of it for this seed)."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 5120)).astype(np.float32)
    layer = QuantizedWeight.from_float(w, 4)
    x = rng.standard_normal(5120).astype(np.float32)
    w_hat = layer.dequantize().astype(np.float64)
    scale = np.abs(w_hat) @ np.abs(x)
    from_x = layer.matvec(x) - w_hat @ x
    from_w = w_hat @ x - w.astype(np.float64) @ x
    assert np.sqrt(np.mean(from_x ** 2)) <= np.sqrt(np.mean(from_w ** 2)) / 8
    assert np.all(np.abs(from_x) <= 2.0**-10 * scale)
    assert np.all(matvec_bound(layer.qweight, layer.scales, 4, x)[0] <= 2.0**-6 * scale)


@pytest.mark.parametrize("bits, x_bits", WEIGHT_KINDS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_the_kernels_multiply_the_x_of_round_activation(bits, x_bits, data):
    """Rows of one code (W = the identity: codes 1, or 9 - 8 at 4 bits, scales 1) give y_i = xq_i * dx, the rounded
    x_i itself: the matvec, a batch and the GEMM round x exactly as bcnp.quant.round_activation specifies."""
    n = 32 * data.draw(st.integers(1, 9))
    tokens = data.draw(st.sampled_from([1, 2, 3, 5, 8, 9, 16, 17]))
    x = np.asarray(data.draw(st.lists(st.floats(-1e4, 1e4, width=32), min_size=tokens * n, max_size=tokens * n)),
                   np.float32).reshape(tokens, n) * np.float32(2.0) ** data.draw(st.integers(-60, 60))
    eye = np.eye(n, dtype=np.int8)
    qweight = eye if bits == 8 else quant.pack_nibbles(eye + 8)
    layer = QuantizedWeight(qweight, np.ones((n, n // 32), np.float16), bits, x_bits=x_bits)
    assert same_bits(layer.dequantize(), eye.astype(np.float32))
    want = rounded_activation(x, x_bits) + np.float32(0)         # -0.0 -> 0.0: the kernels' zeros are +0
    assert same_bits(layer.matmul(x), want)
    assert same_bits(layer.matvec(x[0]), want[0])
    assert same_bits(scalar_matvec(layer, x[0]), want[0])
    assert same_bits(quant.prefill(layer, x), want)


def test_round_activation_refuses_rows_of_partial_blocks():
    with pytest.raises(ValueError, match=r"round_activation: x has shape \(2, 33\), expected rows of a multiple of 32"):
        quant.round_activation(np.zeros((2, 33), np.float32), 8)


def test_the_activation_limits_are_the_kernels():
    assert {x_bits: quant._quant.activation_limit(x_bits) for x_bits in (16, 8)} == ACTIVATION_LIMIT == {16: 32767,
                                                                                                     8: 127}


def test_an_int4_model_rounds_x_to_int8_everywhere_and_an_int8_model_to_int16():
    assert (quant.activation_bits(8), quant.activation_bits(4)) == (16, 8)
    w = np.ones((16, 64), np.float32)
    assert QuantizedWeight.from_float(w, 8).x_bits == 16 and QuantizedWeight.from_float(w, 4).x_bits == 8
    assert QuantizedWeight.from_float(w, 8, x_bits=8).with_x_bits(16).x_bits == 16


@pytest.mark.parametrize("bits, x_bits, message", [(4, 16, "x_bits must be 8 for 4-bit weights, got 16"),
                                                   (8, 4, "x_bits must be 16 or 8 for 8-bit weights, got 4"),
                                                   (8, True, "x_bits must be 16 or 8 for 8-bit weights, got True")])
def test_a_weight_refuses_an_x_rounding_its_kernels_lack(bits, x_bits, message):
    with pytest.raises(ValueError, match=message):
        QuantizedWeight.from_float(np.ones((16, 64), np.float32), bits, x_bits=x_bits)


@pytest.mark.parametrize("call", ["matvec", "matmul", "prefill", "limit"])
def test_the_kernels_refuse_other_x_bits(call):
    w = QuantizedWeight.from_float(np.ones((16, 64), np.float32), 8)
    q, d, x = w.qweight, w.scales.view(np.uint16), np.ones((2, 64), np.float32)
    k = quant._quant
    run = {"matvec": lambda: k.matvec_q8_0(q, d, x[0], x_bits=4), "matmul": lambda: k.matmul_q8_0(q, d, x, x_bits=32),
           "prefill": lambda: k.prefill_q8_0(q, d, x, x_bits=0), "limit": lambda: k.activation_limit(4)}[call]
    with pytest.raises(ValueError, match="x_bits must be 16 or 8"):
        run()


@pytest.mark.parametrize("bits, x_bits", WEIGHT_KINDS)
@pytest.mark.parametrize("n_blocks", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 20, 35, 160, 428])
def test_matvec_is_exact_up_to_the_float_sum_when_x_is_on_its_own_grid(bits, x_bits, n_blocks):
    """x = integers times 2^-k with a block maximum of L * 2^-k is its own rounding (L = 32767 for int16 x, 127 for
    int8): then the integer block dot products are exact and only float32 rounding separates the kernels from
    W^ x."""
    rng = np.random.default_rng(n_blocks)
    w = rng.standard_normal((33, 32 * n_blocks)).astype(np.float32)
    layer = QuantizedWeight.from_float(w, bits, x_bits=x_bits)
    limit = ACTIVATION_LIMIT[x_bits]
    ints = rng.integers(-limit, limit + 1, (n_blocks, 32))
    ints[:, 0] = limit
    x = (ints * 2.0 ** rng.integers(-16, 4, (n_blocks, 1))).astype(np.float32).ravel()
    w_hat = layer.dequantize().astype(np.float64)
    want = w_hat @ x
    bound = (n_blocks + 4) * 2.0**-23 * (np.abs(w_hat) @ np.abs(x))
    assert np.all(np.abs(layer.matvec(x) - want) <= bound)
    assert np.all(np.abs(scalar_matvec(layer, x) - want) <= bound)


@pytest.mark.parametrize("bits, x_bits", WEIGHT_KINDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_matvec_propagates_non_finite_inputs(bits, x_bits, bad):
    """A non-finite element makes its block's scale nan: every output is nan, rows of zeros included."""
    w = np.ones((3, 100), np.float32)
    w[1] = 0
    layer = QuantizedWeight.from_float(w, bits, x_bits=x_bits)
    x = np.ones(100, np.float32)
    x[40] = bad
    assert np.isnan(layer.matvec(x)).all() and np.isnan(scalar_matvec(layer, x)).all()


@pytest.mark.parametrize("bits, x_bits", WEIGHT_KINDS)
def test_blas_fallback_multiplies_dequantized_tiles(bits, x_bits, monkeypatch):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((70, 100)).astype(np.float32)
    layer = QuantizedWeight.from_float(w, bits, x_bits=x_bits)
    x = rng.standard_normal((quant.BATCH_TOKENS + 6, 100)).astype(np.float32)
    want = rounded_activation(layer._padded(x), x_bits)[:, :100] @ layer.dequantize().T
    assert np.allclose(quant.dequantized_matmul(layer, layer._padded(x)), want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(QuantizedWeight, "TILE_BYTES", 4 * 128 * 16)       # tiles of 16 rows, the last one short
    assert np.allclose(quant.dequantized_matmul(layer, layer._padded(x)), want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(quant._quant, "GEMM", False)                       # a build without the VNNI GEMM
    assert np.allclose(layer.matmul(x), want, rtol=1e-5, atol=1e-5)
    assert layer.matmul(x).shape == (len(x), 70) and layer.matmul(x[:1]).shape == (1, 70)


def test_thread_count_comes_from_the_argument_or_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert quant._quant.resolve_threads() == 3
    assert quant._quant.resolve_threads(5) == 5
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert quant._quant.resolve_threads() >= 1


@pytest.mark.parametrize("bits", [8, 4])
def test_nbytes_counts_codes_and_scales(bits):
    layer = QuantizedWeight.from_float(np.ones((64, 5120 // 8), np.float32), bits)
    per_block = 34 if bits == 8 else 18                     # GGML's Q8_0 / Q4_0 block sizes
    assert layer.nbytes == 64 * (5120 // 8 // 32) * per_block


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or quant._quant is quant.NumpyKernels,
                    reason="counts a process's threads in Linux's /proc; needs the compiled kernels")
def test_release_threads_lets_the_calling_threads_openmp_team_go_and_the_next_kernel_brings_it_back():
    """A thread that has run a parallel kernel keeps a team of OpenMP threads; a second thread's team beside it
    leaves more threads than cores, and libgomp then wakes its threads for every loop (bcnp.server's loop releases
    the loading thread's)."""
    code = """import os, time
import numpy as np
from bcnp.quant import _quant, quantize_fast
tasks = lambda: set(os.listdir('/proc/self/task'))
before = tasks()
q, d = quantize_fast(np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32), 8)
x = np.random.default_rng(1).standard_normal(512).astype(np.float32)
y = _quant.matvec_q8_0(q, d.view(np.uint16), x, None, 2)
team = tasks() - before
released = _quant.release_threads()
for _ in range(500):
    if not team & tasks():
        break
    time.sleep(0.01)
gone = not team & tasks()
again = _quant.matvec_q8_0(q, d.view(np.uint16), x, None, 2)
print(len(team), released, gone, len(tasks() - before), np.array_equal(again, y))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})                  # a fresh process, 2 threads
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "True", "True", "1", "True"]
