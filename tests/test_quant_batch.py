"""Several tokens through a quantized linear at once: the batched decode kernels (row t of the result is the
single-vector matvec of token t, bit for bit) and the prefill GEMM (on AVX-512 builds the same bits again; elsewhere
within the matvec's error bound)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bcnp import quant
from bcnp.quant import ACTIVATION_LIMIT, QuantizedWeight, dequantize
from conftest import WEIGHT_KINDS, matvec_bound, same_bits, scalar_matvec

SETTINGS = settings(deadline=None, max_examples=60)
BATCHED = {8: "matmul_q8_0", 4: "matmul_q4_0"}


def batched(layer, x, threads=0, simd=True):
    """The compiled batched kernel itself, on x (T, in_features)."""
    kernel = getattr(quant._quant, BATCHED[layer.bits])
    return kernel(layer.qweight, layer.scales.view(np.uint16), layer._padded(x), None, threads, simd,
                  **layer._x_kwargs())


def gemm(layer, x, threads=0, simd=True):
    """The compiled prefill kernel itself (simd=False: its portable C)."""
    kernel = quant._quant.prefill_q8_0 if layer.bits == 8 else quant._quant.prefill_q4_0
    return kernel(layer.qweight, layer.scales.view(np.uint16), layer._padded(x), None, threads, simd,
                  **layer._x_kwargs())


@st.composite
def layer_and_tokens(draw, bits, x_bits, max_tokens=20):
    """A layer whose width covers the SIMD chunking (groups of 2 / 4 blocks, chunks of 16, every tail, padding), whose
    rows cover groups of 16 rows and their tail, and
    T tokens of mixed magnitudes, with zero elements, zero blocks and zero tokens; zero rows and blocks in W too."""
    rows, nb, tokens = draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.integers(1, max_tokens))
    width = 32 * nb - draw(st.integers(0, 31))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = (rng.standard_normal((rows, width)) * 10.0 ** rng.uniform(-3, 1, (rows, 1))).astype(np.float32)
    w[rng.random(rows) < 0.2] = 0
    w[:, 32 * rng.integers(nb):][:, :32] = 0
    x = (rng.standard_normal((tokens, width)) * 10.0 ** rng.uniform(-2, 2, (tokens, width))).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = 0
    x[rng.random(tokens) < 0.2] = 0
    x[:, 32 * rng.integers(nb):][:, :32] = 0
    return QuantizedWeight.from_float(w, bits, x_bits=x_bits), x


# --- the batched decode kernel -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, x_bits", WEIGHT_KINDS)
@SETTINGS
@given(data=st.data())
def test_each_token_of_a_batch_gets_exactly_its_matvec(bits, x_bits, data):
    layer, x = data.draw(layer_and_tokens(bits, x_bits))
    got = batched(layer, x)
    assert got.dtype == np.float32 and got.shape == (x.shape[0], layer.out_features)
    assert same_bits(got, np.stack([layer.matvec(xt) for xt in x]))
    assert same_bits(batched(layer, x, simd=False), np.stack([scalar_matvec(layer, xt) for xt in x]))
    assert same_bits(batched(layer, x, threads=1), batched(layer, x, threads=2))


@pytest.mark.parametrize("bits, x_bits", WEIGHT_KINDS)
@pytest.mark.parametrize("tokens", [2, 7, 8, 9, 16])
def test_batch_at_13b_width_is_exactly_the_matvec(bits, x_bits, tokens):
    """Full-width rows (160 and 428 blocks: many chunks of 16), every token count of a pass and past it."""
    rng = np.random.default_rng(tokens)
    for width in (5120, 13696):
        layer = QuantizedWeight.from_float(rng.standard_normal((24, width)).astype(np.float32), bits, x_bits=x_bits)
        x = rng.standard_normal((tokens, width)).astype(np.float32)
        assert same_bits(batched(layer, x), np.stack([layer.matvec(xt) for xt in x]))


@pytest.mark.parametrize("bits, x_bits", WEIGHT_KINDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_token_leaves_the_others_alone(bits, x_bits, bad):
    rng = np.random.default_rng(bits)
    layer = QuantizedWeight.from_float(rng.standard_normal((5, 200)).astype(np.float32), bits, x_bits=x_bits)
    x = rng.standard_normal((3, 200)).astype(np.float32)
    x[1, 77] = bad
    got = batched(layer, x)
    assert np.isnan(got[1]).all()
    assert same_bits(got[[0, 2]], np.stack([layer.matvec(x[0]), layer.matvec(x[2])]))


@pytest.mark.parametrize("bits, x_bits", WEIGHT_KINDS)
def test_batched_kernel_checks_its_arguments(bits, x_bits):
    layer = QuantizedWeight.from_float(np.ones((4, 64), np.float32), bits, x_bits=x_bits)
    q, d = layer.qweight, layer.scales.view(np.uint16)
    kernel = getattr(quant._quant, BATCHED[bits])
    with pytest.raises(ValueError, match="columns"):
        kernel(q, d, np.ones((2, 96), np.float32))
    with pytest.raises(ValueError, match="scales"):
        kernel(q, d[:3], np.ones((2, 64), np.float32))
    with pytest.raises(ValueError, match="out has shape"):
        kernel(q, d, np.ones((2, 64), np.float32), np.empty((2, 5), np.float32))
    out = np.full((2, 4), np.nan, np.float32)
    assert np.shares_memory(kernel(q, d, np.ones((2, 64), np.float32), out), out)
    assert same_bits(out, np.stack([layer.matvec(np.ones(64, np.float32))] * 2))
    assert kernel(q, d, np.ones((0, 64), np.float32)).shape == (0, 4)


KERNELS = (["amx"] if quant._quant.AMX else []) + (["tokens"] if quant._quant.TOKENS_KERNEL else []) + ["panel"]


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    """Each test with every kernel this machine has for a batch and a prompt: the AMX kernel, the tokens kernel
    (AVX-512 without AMX) and the panel GEMM (with the group matvec for the smallest batches)."""
    monkeypatch.setattr(quant._quant, "AMX", request.param == "amx")
    monkeypatch.setattr(quant._quant, "TOKENS_KERNEL", request.param == "tokens")
    return request.param


@pytest.mark.parametrize("bits, x_bits", WEIGHT_KINDS)
@settings(SETTINGS, suppress_health_check=[HealthCheck.function_scoped_fixture])      # the fixture only sets a flag
@given(data=st.data())
def test_a_token_gets_the_same_bits_alone_in_any_batch_and_in_a_prompt(bits, x_bits, kernel, data):
    """On AVX-512 builds the matvec, every batch size and the prefill GEMM all add the exact block sums in block
    order (the GEMM's specification, its portable C): what a sequence gets never depends on what shares its step.
    Elsewhere the matvec and batches share one kind of sums and prompts are within the matvec's bound."""
    layer, x = data.draw(layer_and_tokens(bits, x_bits, max_tokens=40))
    alone = np.stack([layer.matvec(xt) for xt in x])
    assert same_bits(batched(layer, x[:quant.BATCH_TOKENS]), alone[:quant.BATCH_TOKENS])
    if quant._quant.GROUPS:
        assert same_bits(gemm(layer, x), alone)
        assert same_bits(gemm(layer, x, simd=False), alone)
    else:
        want = x.astype(np.float64) @ layer.dequantize().T.astype(np.float64)
        for t in range(x.shape[0]):
            bound = matvec_bound(layer.qweight, layer.scales, bits, x[t], x_bits)[0]
            assert np.all(np.abs(gemm(layer, x)[t] - want[t]) <= bound)


@pytest.mark.parametrize("bits, x_bits", WEIGHT_KINDS)
@pytest.mark.parametrize("tokens", [1, 3, 5, 8, 9, 12, 16, 17, 33, 40])
def test_the_gemm_at_13b_width_has_the_same_bits_with_every_kernel(bits, x_bits, tokens, kernel):
    """Each padding of the tile unit's tokens two blocks an instruction (1, 3), one block an instruction (5, 8, 9, 12,
    16), an int16 x's switch to the panel GEMM past 16 (AMX) or 32 (the tokens kernel), calls of 16 tokens and a rest
    (17, 33, 40); 40 rows: two groups of 16 for the tile unit or the tokens kernel, 8 left for the portable C; 160
    and 428 blocks (pairs, chunks)."""
    rng = np.random.default_rng(tokens)
    for width in (5120, 13696):
        layer = QuantizedWeight.from_float(rng.standard_normal((40, width)).astype(np.float32), bits, x_bits=x_bits)
        x = rng.standard_normal((tokens, width)).astype(np.float32)
        assert same_bits(gemm(layer, x), gemm(layer, x, simd=False))


@pytest.mark.parametrize("which", [k for k in KERNELS if k != "panel"])     # none without AVX-512: skipped
@pytest.mark.parametrize("bits, x_bits", WEIGHT_KINDS)
@pytest.mark.parametrize("span_bytes", [1, 5120 * 32, 2**40])
@pytest.mark.parametrize("tokens", [18, 20, 31, 57])
def test_how_many_tokens_take_a_group_of_rows_in_turn_changes_no_bit(bits, x_bits, span_bytes, tokens, which,
                                                                    monkeypatch):
    """The AMX kernel and the tokens kernel run every 16 tokens of a span over one group of rows before the next
    group (the rows read from memory once a span): spans of 16 tokens (the least), of 32, or the whole prompt give
    the portable C's bits, over 18 and 20 tokens (AMX: a last set of 2 and 4, two blocks an instruction), 31 (int16
    x takes the tokens kernel up to 32) and 57 (spans and calls that do not divide them), and 40 rows (two groups
    and a rest)."""
    monkeypatch.setattr(quant._quant, "AMX", which == "amx")
    monkeypatch.setattr(quant._quant, "TOKENS_SPAN_BYTES", span_bytes)
    rng = np.random.default_rng(span_bytes % 1000 + tokens)
    layer = QuantizedWeight.from_float(rng.standard_normal((40, 5120)).astype(np.float32), bits, x_bits=x_bits)
    x = rng.standard_normal((tokens, 5120)).astype(np.float32)
    assert same_bits(gemm(layer, x), gemm(layer, x, simd=False))


def test_bcnp_amx_0_leaves_the_tile_unit_out():
    env = dict(os.environ, BCNP_AMX="0")
    out = subprocess.run([sys.executable, "-c", "import bcnp.quant as q; print(q._quant.AMX)"], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the prefill GEMM ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, x_bits", WEIGHT_KINDS)
@settings(SETTINGS, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_prefill_is_within_the_matvec_bound_of_the_float_product(bits, x_bits, kernel, data):
    """The same rounding of x and exact integer block sums as the matvec, one float32 sum over the blocks:
    the matvec's bound holds for every token; rows not a multiple of the panel (32) and tokens not of the tile (6)."""
    layer, x = data.draw(layer_and_tokens(bits, x_bits, max_tokens=40))
    rows = data.draw(st.integers(1, 70))
    layer = QuantizedWeight(np.repeat(layer.qweight, -(-rows // layer.out_features), 0)[:rows],
                            np.repeat(layer.scales, -(-rows // layer.out_features), 0)[:rows], bits, layer.in_features,
                            x_bits)
    got = gemm(layer, x)
    assert got.dtype == np.float32 and got.shape == (x.shape[0], rows)
    want = x.astype(np.float64) @ dequantize(layer.qweight, layer.scales, bits, layer.in_features).T.astype(np.float64)
    for t in range(x.shape[0]):
        assert np.all(np.abs(got[t] - want[t]) <= matvec_bound(layer.qweight, layer.scales, bits, x[t], x_bits)[0])
    assert same_bits(gemm(layer, x, simd=False), got)             # the portable C adds the same terms in order
    assert same_bits(gemm(layer, x, threads=1), gemm(layer, x, threads=2))


@pytest.mark.parametrize("bits, x_bits", WEIGHT_KINDS)
@pytest.mark.parametrize("rows, tokens", [(1, 1), (31, 7), (33, 6), (64, 13), (70, 40)])
def test_prefill_is_exact_where_every_float_step_is(bits, x_bits, rows, tokens, kernel):
    """Power-of-two scales (d = 2^k per row: one code at the format's extreme), x on its own grid (dx = 2^j
    per token: a block maximum of L 2^j, ACTIVATION_LIMIT) and integer sums under 2^24: every float32 step is
    exact, so each output is W^ x to the bit -- which
    pins down the packing of rows and pairs, the tiling of tokens and the scales."""
    rng = np.random.default_rng(rows * tokens + bits)
    nb = 16
    codes = rng.integers(-15, 16, (rows, nb, 32))
    codes[:, :, 0] = 127 if bits == 8 else -8
    if bits == 4:
        codes = np.clip(codes, -8, 7)
    w = (codes * 2.0 ** rng.integers(-8, 2, (rows, 1, 1))).reshape(rows, -1).astype(np.float32)
    limit = ACTIVATION_LIMIT[x_bits]
    ints = rng.integers(-min(400, limit), min(400, limit) + 1, (tokens, nb, 32))
    ints[:, :, 5] = limit
    x = (ints * 2.0 ** rng.integers(-12, 0, (tokens, 1, 1))).reshape(tokens, -1).astype(np.float32)
    layer = QuantizedWeight.from_float(w, bits, x_bits=x_bits)
    w_hat = layer.dequantize().astype(np.float64)
    assert np.array_equal(w_hat, w)
    assert same_bits(gemm(layer, x), (x.astype(np.float64) @ w_hat.T).astype(np.float32))


@pytest.mark.parametrize("bits, x_bits, relative", [(8, 16, 2.0**-16), (8, 8, 2.0**-10), (4, 8, 2.0**-10)])
def test_prefill_error_at_13b_width_is_the_matvecs(bits, x_bits, relative):
    """As the matvec (tests/test_matvec.py): float32-sized for x rounded to int16, x's rounding for int8 x."""
    rng = np.random.default_rng(bits)
    for width in (5120, 13696):
        layer = QuantizedWeight.from_float(rng.standard_normal((40, width)).astype(np.float32), bits, x_bits=x_bits)
        x = rng.standard_normal((20, width)).astype(np.float32)
        w_hat = layer.dequantize().astype(np.float64)
        assert np.all(np.abs(gemm(layer, x) - x @ w_hat.T) <= relative * (np.abs(x) @ np.abs(w_hat).T))


@pytest.mark.parametrize("bits, x_bits", WEIGHT_KINDS)
def test_prefill_propagates_a_non_finite_token_to_its_row_only(bits, x_bits, kernel):
    rng = np.random.default_rng(bits)
    layer = QuantizedWeight.from_float(rng.standard_normal((40, 96)).astype(np.float32), bits, x_bits=x_bits)
    x = rng.standard_normal((20, 96)).astype(np.float32)
    x[3, 50] = np.inf
    got = gemm(layer, x)
    assert np.isnan(got[3]).all() and np.isfinite(np.delete(got, 3, 0)).all()


@pytest.mark.parametrize("bits, x_bits", WEIGHT_KINDS)
def test_matmul_picks_the_kernel_by_token_count(bits, x_bits):
    """1 token: the matvec; up to BATCH_TOKENS: the batched kernel (each row its matvec, bit for bit); beyond:
    the prefill GEMM (or BLAS where it is not compiled in)."""
    rng = np.random.default_rng(bits)
    layer = QuantizedWeight.from_float(rng.standard_normal((50, 300)).astype(np.float32), bits, x_bits=x_bits)
    x = rng.standard_normal((quant.BATCH_TOKENS + 1, 300)).astype(np.float32)
    assert same_bits(layer.matmul(x[:1]), layer.matvec(x[0])[None])
    assert same_bits(layer.matmul(x[:-1]), np.stack([layer.matvec(xt) for xt in x[:-1]]))
    assert same_bits(layer.matmul(x), gemm(layer, x) if quant._quant.GEMM else
                     quant.dequantized_matmul(layer, layer._padded(x)))
