"""The NumPy twins of the CUDA kernels (bcnp.gpu.kernels): line by line what the kernels compute (a transcription
of the CUDA by hand), and what they should compute (bcnp.quant, the model's own functions).
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import strict_xp
from bcnp.gpu import kernels as gpu_kernels
from bcnp.gpu.weights import DeviceQuantizedWeight
from bcnp.quant import dequantize
from conftest import random_weight, twin_matvec

# --- the kernels' NumPy twins --------------------------------------------------------------------------------------

def reference_weight(qweight, scales, bits):
    return qweight.astype(np.float64) if bits == 16 else dequantize(qweight, scales, bits).astype(np.float64)


def r32(value):
    """One float32 operation of a kernel as CuPy compiles it (-ftz=true): rounded to float32, a subnormal result
    flushed to zero of its sign."""
    value = np.float32(value)
    return np.copysign(np.float32(0), value) if abs(value) < 2.0**-126 else value


def flushed(a):
    """A kernel's float32 operands as -ftz=true reads them: subnormals as zero."""
    a = np.asarray(a, np.float32)
    return np.where(np.abs(a) < 2.0**-126, np.copysign(np.float32(0), a), a)


def kernel_by_hand(qweight, scales, bits, x):
    """The matvec kernels of quant_kernels.cu transcribed line by line in float32 scalars: lane `lane` takes
    words lane, lane + 32, ...; each word's products summed in order, times the block's d, into the lane's sum;
    then the warp halves: lane i += lane i ^ 16, ^ 8, ^ 4, ^ 2, ^ 1. Under -ftz=true (r32, flushed)."""
    f32 = np.float32
    x = flushed(x)
    rows, n_pad = qweight.shape[0], qweight.shape[1] * (2 if bits == 4 else 1)
    words = n_pad // (8 if bits == 4 else 4)
    y = np.zeros(rows, np.float32)
    for row in range(rows):
        acc = [f32(0)] * 32
        for lane in range(32):
            for w in range(lane, words, 32):
                if bits == 4:
                    b, m = w // 4, w % 4
                    word = qweight[row, 16 * b + 4 * m: 16 * b + 4 * m + 4]
                    values = [f32(int(v) & 15) - f32(8) for v in word] + [f32(int(v) >> 4) - f32(8) for v in word]
                    xs = list(x[32 * b + 4 * m: 32 * b + 4 * m + 4]) + list(x[32 * b + 16 + 4 * m: 32 * b + 20 + 4 * m])
                    d = f32(scales[row, b])
                else:
                    values = [f32(v) for v in qweight[row, 4 * w: 4 * w + 4]]
                    xs = list(x[4 * w: 4 * w + 4])
                    d = None if bits == 16 else f32(scales[row, w // 8])
                s = f32(0)
                for v, xv in zip(values, xs):
                    s = r32(s + r32(v * xv))
                acc[lane] = r32(acc[lane] + (s if d is None else r32(s * d)))
        for offset in (16, 8, 4, 2, 1):
            acc = [r32(acc[i] + acc[i ^ offset]) for i in range(32)]
        y[row] = acc[0]
    return y


@pytest.mark.parametrize("bits", [8, 4, 16])
@pytest.mark.parametrize("in_features", [32, 172, 300])           # one step, a partial step, several steps
def test_matvec_twins_are_the_kernels_line_by_line(bits, in_features):
    qweight, scales = random_weight(bits + in_features, 5, in_features, bits)
    x = gpu_kernels.pad_columns(np, np.random.default_rng(1).standard_normal(in_features).astype(np.float32),
                            qweight.shape[1] * (2 if bits == 4 else 1))
    np.testing.assert_array_equal(twin_matvec(np, qweight, scales, bits, x), kernel_by_hand(qweight, scales, bits, x))


def block_sum_by_hand(values, threads):
    """A block's sum in the kernels' order, in float32 scalars: thread t adds values t, t + threads, ...; each
    warp halves its lanes; warps 0, 1, ... are added in order."""
    f32 = np.float32
    by_thread = [f32(0)] * threads
    for t in range(threads):
        for j in range(t, len(values), threads):
            by_thread[t] = r32(by_thread[t] + values[j])
    warps = []
    for w in range(threads // 32):
        acc = by_thread[32 * w: 32 * w + 32]
        for offset in (16, 8, 4, 2, 1):
            acc = [r32(acc[i] + acc[i ^ offset]) for i in range(32)]
        warps.append(acc[0])
    total = warps[0]
    for v in warps[1:]:
        total = r32(total + v)
    return total


def rms_norm_by_hand(row, weight, eps):
    """The kernel rms_norm_f32 for one row, line by line in float32 scalars."""
    f32 = np.float32
    row, weight = flushed(row), flushed(weight)
    total = block_sum_by_hand([r32(v * v) for v in row], gpu_kernels.NORM_THREADS)
    r = r32(f32(1) / r32(np.sqrt(r32(r32(total / f32(len(row))) + f32(eps)))))
    return [r32(r32(v * r) * w) for v, w in zip(row, weight)]


def attention_by_hand(q, k, v, bias, sqrt_hd):
    """The kernels attention_decode and attention_combine for one head, line by line in float32 scalars (exp on
    arrays, as the twin does)."""
    f32, chunk, warps = np.float32, gpu_kernels.ATTENTION_CHUNK, gpu_kernels.ATTENTION_WARPS
    S, hd = k.shape
    q, k, v, bias = (flushed(a.astype(np.float32)) for a in (q, k, v, bias))
    parts = []
    for c in range(-(-S // chunk)):                       # block (h, c): thread t takes key c * CHUNK + t
        scores = []
        for j in range(c * chunk, (c + 1) * chunk):
            s = f32(-np.inf)
            if j < S:
                dot = f32(0)
                for d in range(hd):
                    dot = r32(dot + r32(q[d] * k[j, d]))
                s = r32(r32(dot / f32(sqrt_hd)) + bias[j])
            scores.append(s)
        m = max(scores)
        e = flushed(np.exp(flushed(np.array(scores, np.float32) - (f32(0) if m == -np.inf else m))))
        l = block_sum_by_hand(list(e), chunk)
        acc = [[f32(0)] * hd for _ in range(warps)]
        for w in range(warps):                          # warp w: keys w, w + WARPS, ... of the chunk
            for i in range(w, min(chunk, S - c * chunk), warps):
                for d in range(hd):
                    acc[w][d] = r32(acc[w][d] + r32(e[i] * v[c * chunk + i, d]))
        o = [acc[0][d] for d in range(hd)]
        for w in range(1, warps):
            o = [r32(o[d] + acc[w][d]) for d in range(hd)]
        parts.append((m, l, o))
    if len(parts) == 1:
        m, l, o = parts[0]
        return [r32(o[d] / l) for d in range(hd)]
    M = max(m for m, _, _ in parts)                     # attention_combine
    scales = flushed(np.exp(flushed(np.array([m for m, _, _ in parts], np.float32) - M)))
    L, out = f32(0), [f32(0)] * hd
    for (m, l, o), scale in zip(parts, scales):
        L = r32(L + r32(l * scale))
        out = [r32(out[d] + r32(o[d] * scale)) for d in range(hd)]
    return [r32(out[d] / L) for d in range(hd)]


@pytest.mark.parametrize("n", [1, 37, 300, 600])
def test_rms_norm_twin_is_the_kernel_line_by_line(n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((2, n)) * 5).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, n).astype(np.float32)
    want = np.array([rms_norm_by_hand(row, weight, 1e-6) for row in x], np.float32)
    np.testing.assert_array_equal(gpu_kernels.rms_norm_f32(np, x, weight, 1e-6), want)


@pytest.mark.parametrize("S, hd, masked_from", [(1, 8, 1), (37, 40, 19), (300, 64, 151), (600, 16, 200)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_attention_twin_is_the_kernel_line_by_line(S, hd, masked_from, dtype):
    """One chunk, several, and (600 keys, masked from 200) a chunk whose keys are all masked."""
    rng = np.random.default_rng(S + hd)
    nh = 2
    q = rng.standard_normal((nh, hd)).astype(np.float32)
    k, v = (rng.standard_normal((nh, S, hd)).astype(dtype) for _ in range(2))
    bias = rng.standard_normal((nh, S)).astype(np.float32)
    bias[:, masked_from:] = -np.inf
    want = np.array([attention_by_hand(q[h], k[h], v[h], bias[h], hd ** 0.5) for h in range(nh)], np.float32)
    np.testing.assert_array_equal(gpu_kernels.attention_decode(np, q, k, v, bias, hd ** 0.5), want)


def subnormal_mixture(rng, shape, tiny_share=0.5):
    """Standard normal values of which about `tiny_share` scaled down to the float32 subnormal range and below
    (2^-126 ... 2^-149) or just above it, where a product or a sum lands in the subnormals."""
    x = rng.standard_normal(shape)
    tiny = rng.random(shape) < tiny_share
    x[tiny] *= 2.0 ** rng.uniform(-150, -110, tiny.sum())
    return x.astype(np.float32)


@pytest.mark.parametrize("bits", [8, 4, 16])
def test_twins_flush_subnormals_as_the_kernels_do_under_ftz(bits):
    """CuPy's -ftz=true: subnormal operands and results of float32 operations count as zero. The twins and the
    line-by-line kernels agree on inputs made of them, and differ from plain IEEE arithmetic there."""
    rng = np.random.default_rng(bits)
    qweight, scales = random_weight(bits, 5, 64, bits)
    x = subnormal_mixture(rng, 64, tiny_share=1.0)                 # every x below or near 2^-126
    got = twin_matvec(np, qweight, scales, bits, x)
    np.testing.assert_array_equal(got, kernel_by_hand(qweight, scales, bits, x))
    w = reference_weight(qweight, scales, bits)
    assert np.all(got[np.abs(w @ x) < 2.0**-126] == 0) and np.any(w @ flushed(x) != w @ x)
    x = subnormal_mixture(rng, (2, 300))
    np.testing.assert_array_equal(gpu_kernels.rms_norm_f32(np, x, np.ones(300, np.float32), 1e-6),
                                  np.array([rms_norm_by_hand(row, np.ones(300), 1e-6) for row in x], np.float32))
    q, k, v = subnormal_mixture(rng, (2, 16)), subnormal_mixture(rng, (2, 40, 16)), subnormal_mixture(rng, (2, 40, 16))
    bias = np.zeros((2, 40), np.float32)
    want = np.array([attention_by_hand(q[h], k[h], v[h], bias[h], 4.0) for h in range(2)], np.float32)
    np.testing.assert_array_equal(gpu_kernels.attention_decode(np, q, k, v, bias, 4.0), want)
    assert gpu_kernels.flush(np.float32([2.0**-127, -2.0**-130, np.nan, -np.inf, 2.0**-126])).tolist()[:2] == [0.0, 0.0]
    assert np.signbit(gpu_kernels.flush(np.float32([-2.0**-130])))[0]


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([8, 4, 16]), rows=st.integers(1, 40), in_features=st.integers(1, 700),
       seed=st.integers(0, 2**16))
def test_matvec_twins_compute_w_times_x(bits, rows, in_features, seed):
    qweight, scales = random_weight(seed, rows, in_features, bits)
    w = reference_weight(qweight, scales, bits)
    x = np.zeros(w.shape[1], np.float32)                           # zero in the padding, as the kernels expect
    x[:in_features] = np.random.default_rng(seed + 1).standard_normal(in_features)
    y = twin_matvec(np, qweight, scales, bits, x)
    assert y.dtype == np.float32 and y.shape == (rows,)
    # float32 rounding: each product and each of at most n + 6 additions on its path errs by <= 2^-24 relative
    bound = (w.shape[1] + 8) * 2.0**-24 * (np.abs(w) @ np.abs(x.astype(np.float64))) + 1e-30
    assert np.all(np.abs(y - w @ x.astype(np.float64)) <= bound)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([8, 4]), rows=st.integers(1, 40), in_features=st.integers(1, 700),
       seed=st.integers(0, 2**16))
def test_dequantize_twins_equal_bcnp_quant(bits, rows, in_features, seed):
    qweight, scales = random_weight(seed, rows, in_features, bits)
    twin = gpu_kernels.dequantize_q8_0 if bits == 8 else gpu_kernels.dequantize_q4_0
    want = dequantize(qweight, scales, bits)
    np.testing.assert_array_equal(twin(np, qweight, scales, np.float32), want)
    np.testing.assert_array_equal(twin(np, qweight, scales, np.float16), want.astype(np.float16))


@pytest.mark.parametrize("bits", [8, 4, 16])
def test_device_weight_matmul_on_the_strict_module(bits):
    qweight, scales = random_weight(bits, 24, 200, bits)
    w = reference_weight(qweight, scales, bits)[:, :200]
    x = np.random.default_rng(2).standard_normal((3, 200)).astype(np.float32)
    for dtype, tolerance in ((np.float32, 1e-5), (np.float16, 2e-3)):
        device = DeviceQuantizedWeight(strict_xp, strict_xp.asarray(qweight),
                                       None if scales is None else strict_xp.asarray(scales), bits, 200, dtype)
        for T in (1, 3):                                            # the matvec twin, then expand + matmul
            y = device.matmul(strict_xp.asarray(x[:T])).get()
            assert y.shape == (T, 24) and y.dtype == np.float32
            assert np.abs(y - x[:T] @ w.T).max() <= tolerance * (np.abs(x[:T]) @ np.abs(w).T).max()
