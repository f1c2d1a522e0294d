"""The GPU code (bcnp.gpu) and moving a model there (bcnp.api.to_device / to_host).

Without a GPU (CI): the whole forward pass runs through `to_device(model, xp=strict_xp)`, an array module that
refuses implicit conversions to NumPy as CuPy does, with the CUDA kernels replaced by their NumPy twins; the twins
are checked against bcnp.quant and against a line-by-line transcription of the kernels; the CUDA source compiles
with nvcc where nvcc exists; asking for CUDA without CuPy is one clear error.
With a GPU (marker gpu): the golden fixtures on CuPy, the kernels against their twins, decode against prefill.
"""
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import strict_xp
from bcnp import Model
from bcnp.api import to_device, to_host
from bcnp.gpu import kernels as gpu_kernels
from bcnp.gpu.cache import DeviceKVCache, GraphKVCache, clamp_to_float16
from bcnp.gpu.graphs import DecodeGraphs
from bcnp.gpu.kernels import BackendError
from bcnp.gpu.weights import DeviceQuantizedWeight
from bcnp.tensor import Tensor
from bcnp.quant import QuantizedWeight, dequantize, quantize
from conftest import FIXTURES, MODELS


def scaled_error(got, want):
    """SPEC §7: max |Δ| / max(1, max |logit|)."""
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


def prefill_then_decode(model, prompt, split=26):
    """Logits of `split` tokens at once, then one token at a time (the cached path)."""
    cache = model.new_cache()
    return np.concatenate([model.forward(prompt[:split], cache)] + [model.forward([t], cache) for t in prompt[split:]])


@pytest.fixture(scope="module", params=MODELS)
def fixture_model(request):
    return Model.from_pretrained(FIXTURES / request.param / "hf"), np.load(FIXTURES / request.param / "golden.npz")


# --- the strict array module ---------------------------------------------------------------------------------------

def test_strict_module_refuses_every_implicit_conversion_to_numpy():
    a = strict_xp.asarray([1.0, 2.0], dtype=np.float32)
    refused = [lambda: np.asarray(a), lambda: a + np.ones(2), lambda: np.ones(2) * a, lambda: np.exp(a),
               lambda: np.concatenate([a, a]), lambda: strict_xp.concatenate([a, np.ones(2)]),
               lambda: a[np.array([0])], lambda: a.__setitem__(0, np.ones(1))]
    for conversion in refused:
        with pytest.raises(TypeError, match="strict_xp|does not support ufuncs"):
            conversion()
    # what CuPy allows: scalars of either kind, xp functions, explicit copies both ways
    b = strict_xp.exp(a * np.float32(2) + 1.0)
    assert isinstance(b, strict_xp.StrictArray) and isinstance(b.get(), np.ndarray)
    np.testing.assert_allclose(b.get(), np.exp(np.array([3.0, 5.0], np.float32)))
    assert isinstance(a.sum(), strict_xp.StrictArray) and float(a.sum()) == 3.0


def test_a_stray_numpy_call_in_the_forward_pass_fails_on_the_strict_module(monkeypatch):
    model = Model.from_pretrained(FIXTURES / MODELS[0] / "hf")
    import bcnp.forward
    monkeypatch.setattr(bcnp.forward, "silu", lambda xp, x: x / (1.0 + np.exp(-x)))     # np. where xp. belongs
    model.logits([1, 2, 3])                                                             # NumPy does not notice
    with pytest.raises(TypeError, match="strict_xp|does not support ufuncs"):
        to_device(model, xp=strict_xp, dtype="float32").logits([1, 2, 3])


# --- the whole forward pass on the strict module -------------------------------------------------------------------

def test_float32_forward_on_the_strict_module_equals_numpy_and_the_original(fixture_model):
    model, golden = fixture_model
    device = to_device(model, xp=strict_xp, dtype="float32")
    assert device.xp is strict_xp and all(isinstance(v, strict_xp.StrictArray) for v in device.w.values())
    for i in range(3):
        prompt = golden[f"prompt_{i}"]
        logits = device.logits(prompt)
        assert scaled_error(logits, model.logits(prompt)) <= 1e-5
        assert scaled_error(logits, golden[f"logits_full_{i}"]) <= 1e-4
    assert scaled_error(prefill_then_decode(device, golden["prompt_2"]), golden["logits_prefill_decode_2"]) <= 1e-4


def test_float16_forward_on_the_strict_module_is_within_the_float16_tolerance(fixture_model):
    model, golden = fixture_model
    device = to_device(model, xp=strict_xp)                      # the GPU default: float16 weights and cache
    linears = [v for v in device.w.values() if isinstance(v, DeviceQuantizedWeight)]
    assert linears and all(v.bits == 16 and v.qweight.dtype == np.float16 for v in linears)
    assert device.new_cache(4).k.dtype == np.float16
    assert scaled_error(device.logits(golden["prompt_2"]), golden["logits_full_2"]) <= 1e-2
    assert scaled_error(prefill_then_decode(device, golden["prompt_2"]), golden["logits_prefill_decode_2"]) <= 1e-2


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_forward_on_the_strict_module_matches_the_cpu_quantized_model(fixture_model, bits):
    model, golden = fixture_model
    prompt = golden["prompt_2"]
    cpu = model.quantize(bits)
    dequantized = {k: v.dequantize() if isinstance(v, QuantizedWeight) else v for k, v in cpu.w.items()}
    want = Model(cpu.config, dequantized).logits(prompt)   # dequantized float32 weights, BLAS: the exact reference
    device = to_device(cpu, xp=strict_xp, dtype="float32")
    assert scaled_error(device.logits(prompt), want) <= 1e-5
    # one token at a time runs the matvec twins (the CPU's own kernels round x to int16: not the reference here)
    assert scaled_error(prefill_then_decode(device, prompt), want) <= 1e-5
    half = to_device(cpu, xp=strict_xp)
    assert scaled_error(half.logits(prompt), want) <= 1e-2
    assert scaled_error(prefill_then_decode(half, prompt), want) <= 1e-2


def with_huge_attention_inputs(model, factor=1e6):
    """The model with layer 0's input_layernorm scaled by `factor`: its q, k, v (and so its float16 prefill
    products and cache entries) go far beyond float16's 65504, though every weight stays within it."""
    w = dict(model.w)
    w["model.layers.0.input_layernorm.weight"] = w["model.layers.0.input_layernorm.weight"] * np.float32(factor)
    return model._with_weights(w, np)


def test_float16_overflow_neither_makes_nan_in_prefill_nor_in_the_cache(fixture_model):
    model, golden = fixture_model
    big = with_huge_attention_inputs(model)
    prompt = golden["prompt_2"]
    exact = to_device(big, xp=strict_xp, dtype="float32")
    cache32 = exact.new_cache(len(prompt))
    want = exact.forward(prompt, cache32)
    assert np.isfinite(want).all() and np.abs(cache32.v.get()).max() > 4 * 65504     # the overflow is real
    half = to_device(big, xp=strict_xp)
    cache = half.new_cache(len(prompt))
    got = half.forward(prompt[:26], cache)                          # prefill: products checked, cache clamped
    got = np.concatenate([got] + [half.forward([t], cache) for t in prompt[26:]])      # decode: the kernels' twins
    assert np.isfinite(got).all()
    for stored in (cache.k.get(), cache.v.get()):
        assert np.abs(stored).max() == 65504 and np.isfinite(stored).all()
    # (the clamped values are not the model's: only a float32 cache, dtype="float32", keeps such a model exact)


def test_a_float16_prefill_product_beyond_65504_is_computed_in_float32():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((6, 64)).astype(np.float16)
    x = (rng.standard_normal((3, 64)) * 3e4).astype(np.float32)    # x and x @ w.T beyond float16
    weight = DeviceQuantizedWeight(strict_xp, strict_xp.asarray(w), None, 16, 64, np.float16)
    y = weight.matmul(strict_xp.asarray(x)).get()
    np.testing.assert_allclose(y, x @ w.astype(np.float32).T, rtol=1e-5)
    small = weight.matmul(strict_xp.asarray(x / 3e4)).get()        # within range: the float16 product
    np.testing.assert_array_equal(small, ((x / 3e4).astype(np.float16).astype(np.float32)
                                          @ w.astype(np.float32).T).astype(np.float16).astype(np.float32))


def test_to_host_brings_back_the_same_weights(fixture_model):
    model, golden = fixture_model
    back = to_host(to_device(model, xp=strict_xp, dtype="float32"))
    assert back.xp is np and scaled_error(back.logits(golden["prompt_1"]), model.logits(golden["prompt_1"])) == 0
    quantized = model.quantize(4)
    back = to_host(to_device(quantized, xp=strict_xp))
    for name, w in quantized.w.items():
        if isinstance(w, QuantizedWeight):
            assert isinstance(back.w[name], QuantizedWeight) and back.w[name].bits == w.bits
            np.testing.assert_array_equal(back.w[name].qweight, w.qweight)
            np.testing.assert_array_equal(back.w[name].scales, w.scales)
        else:
            np.testing.assert_array_equal(back.w[name], w.astype(back.w[name].dtype))
    half = to_host(to_device(model, xp=strict_xp))                # float16 on the device: rounded once
    name = "model.layers.0.mlp.down_proj.weight"                  # in_features 344 / 172: padded on the device
    np.testing.assert_array_equal(half.w[name], model.w[name].astype(np.float16).astype(np.float32))


def test_to_device_reads_a_checkpoint_one_tensor_at_a_time_and_keeps_no_host_copy():
    model = Model.from_pretrained(FIXTURES / MODELS[0] / "hf")
    floats = {name for name, v in model.weights.items() if isinstance(v, Tensor)}
    assert floats                                                   # mapped, nothing read yet
    device = to_device(model, xp=strict_xp)
    assert {name for name, v in model.weights.items() if isinstance(v, Tensor)} == floats    # none kept read
    assert set(device.w) == set(model.weights)


def test_to_device_errors_name_the_problem():
    model = Model.from_pretrained(FIXTURES / MODELS[1] / "hf")
    with pytest.raises(ValueError, match="dtype must be 'float16' or 'float32'"):
        to_device(model, xp=strict_xp, dtype="bfloat16")
    big = dict(model.w)
    big["lm_head.weight"] = big["lm_head.weight"] * 1e6
    with pytest.raises(ValueError, match=r"lm_head.weight.*float16.*dtype='float32'"):
        to_device(model._with_weights(big, np), xp=strict_xp)
    device = to_device(model, xp=strict_xp)
    assert to_device(device, xp=strict_xp) is device
    with pytest.raises(ValueError, match="model.cpu"):
        to_device(device, xp=types.SimpleNamespace(__name__="other"))


# --- asking for CUDA where there is none --------------------------------------------------------------------------

def test_cuda_without_cupy_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)                 # `import cupy` now fails, GPU or not
    model = Model.from_pretrained(FIXTURES / MODELS[1] / "hf")
    with pytest.raises(BackendError) as e:
        model.cuda()
    assert str(e.value).startswith("CUDA requested but CuPy is not installed: pip install bcnp[cuda12]")
    assert "\n" not in str(e.value)


def test_cuda_without_a_device_is_one_clear_error(monkeypatch):
    def no_device():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected\n(details)")
    fake = types.SimpleNamespace(__name__="cupy", cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=no_device)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(BackendError, match=r"^CUDA requested but no CUDA device found \(cudaErrorNoDevice") as e:
        Model.from_pretrained(FIXTURES / MODELS[1] / "hf").cuda()
    assert "\n" not in str(e.value)


# --- the kernels' NumPy twins --------------------------------------------------------------------------------------

def random_weight(seed, rows, in_features, bits):
    """A weight in the form a kernel reads: (qweight, scales) or float16 values, padded to whole blocks."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, in_features)) * rng.uniform(0.01, 2.0, (rows, 1))).astype(np.float32)
    if bits == 16:
        return gpu_kernels.pad_columns(np, w.astype(np.float16), -(-in_features // 32) * 32), None
    return quantize(w, bits)


def reference_weight(qweight, scales, bits):
    return qweight.astype(np.float64) if bits == 16 else dequantize(qweight, scales, bits).astype(np.float64)


def twin_matvec(xp, qweight, scales, bits, x):
    if bits == 16:
        return gpu_kernels.matvec_f16(xp, qweight, x)
    return (gpu_kernels.matvec_q8_0 if bits == 8 else gpu_kernels.matvec_q4_0)(xp, qweight, scales, x)


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


# --- the CUDA source -------------------------------------------------------------------------------------------------

def kernel_source():
    with open(gpu_kernels.KERNEL_SOURCE, encoding="utf-8") as f:
        return f.read()


def test_kernel_names_and_launch_shapes_agree_with_the_source():
    source = kernel_source()
    assert set(re.findall(r'extern "C" __global__ void (\w+)\(', source)) == set(gpu_kernels.KERNEL_NAMES)
    define = {name: int(value) for name, value in re.findall(r"#define (\w+) (\d+)", source)}
    assert gpu_kernels.MATVEC_THREADS == 32 * define["WARPS"]
    assert gpu_kernels.MATVEC_ROWS_PER_BLOCK == define["WARPS"] * define["ROWS"]
    assert (gpu_kernels.ATTENTION_WARPS, gpu_kernels.MAX_DIMS_PER_LANE) == (define["ATTENTION_WARPS"],
                                                                    define["MAX_DIMS_PER_LANE"])
    assert gpu_kernels.NORM_THREADS == define["NORM_THREADS"]


def kernel_signatures():
    """{kernel: [(C type, parameter name), ...]} from the extern "C" declarations of quant_kernels.cu."""
    signatures = {}
    code = re.sub(r"//[^\n]*", "", kernel_source())
    for name, params in re.findall(r'extern "C" __global__ void (\w+)\(([^)]*)\)', code):
        params = [re.sub(r"__restrict__|const", "", p).split() for p in params.split(",")]
        signatures[name] = [(" ".join(p[:-1]).replace(" *", "*"), p[-1].lstrip("*")) for p in params]
    return signatures


# what a launch may pass for each C parameter type: device arrays of these dtypes, or np.int32
C_TYPES = {"unsigned int*": (np.int8, np.uint8), "unsigned short*": (np.float16,), "float*": (np.float32,),
           "uint2*": (np.float16,), "int": (np.int32,), "float": (np.float32,), "long long*": (np.int64,)}


def fake_kernels(launched=None):
    """Stand-ins for the RawKernels: each checks a launch against the kernel's C signature (argument count and
    types, one thread per word or enough warps for every row) and computes its result with the NumPy twin.
    `launched`, a list, receives each launched kernel's name."""
    signatures = kernel_signatures()

    def launch(name):
        def kernel(grid, block, args, shared_mem=0):
            if launched is not None:
                launched.append(name)
            params = signatures[name]
            assert len(args) == len(params), name
            bound = {}
            for (ctype, pname), arg in zip(params, args):
                dtype = arg.dtype if isinstance(arg, strict_xp.StrictArray) else type(arg)
                assert np.dtype(dtype) in [np.dtype(t) for t in C_TYPES[ctype]], \
                    f"{name}: {pname} is {ctype}, got {dtype}"
                bound[pname] = arg
            if name == "rms_norm_f32":
                x, out = bound["x"], bound["out"]
                assert grid == (x.shape[0],) and block == (gpu_kernels.NORM_THREADS,) and shared_mem == 0
                assert out.shape == x.shape and bound["w"].shape == (x.shape[1],) == (int(bound["n"]),)
                out[...] = gpu_kernels.rms_norm_f32(strict_xp, x, bound["w"], float(bound["eps"]))
                return
            if name == "silu_mul_f32":
                n = int(bound["n"])
                assert bound["gate"].size == bound["up"].size == bound["out"].size == n
                assert block == (gpu_kernels.ELEMENTWISE_THREADS,)
                assert (grid[0] - 1) * block[0] < n <= grid[0] * block[0]
                bound["out"][...] = gpu_kernels.silu_mul_f32(strict_xp, bound["gate"], bound["up"])
                return
            if name.startswith("kv_store"):
                nh, hd, max_len = int(bound["nh"]), int(bound["hd"]), int(bound["max_len"])
                assert bound["k"].shape == bound["v"].shape == (nh * hd,) and bound["position"].shape == (1,)
                assert bound["cache_k"].shape == bound["cache_v"].shape == (nh, max_len, hd)
                assert block == (gpu_kernels.ELEMENTWISE_THREADS,)
                assert (grid[0] - 1) * block[0] < nh * hd <= grid[0] * block[0]
                position = bound["position"]
                for new, cache in ((bound["k"], bound["cache_k"]), (bound["v"], bound["cache_v"])):
                    if cache.dtype == np.float16:                          # saturates at +-65504
                        new = clamp_to_float16(new)
                    cache[:, position] = new.reshape(nh, 1, hd).astype(cache.dtype)
                return
            if name == "attention_combine":
                scratch, out = bound["scratch"], bound["out"]
                chunks, hd = int(bound["chunks"]), int(bound["hd"])
                nh = out.shape[0]
                assert chunks > 1 and grid == (nh,) and block[0] % 32 == 0 and hd <= block[0] < hd + 32
                assert scratch.shape == (nh, chunks, hd + 2) and out.shape == (nh, hd)
                out[...] = gpu_kernels.attention_combine(strict_xp, scratch[:, :, 0], scratch[:, :, 1],
                                                         scratch[:, :, 2:])
                return
            if name.startswith("attention"):
                q, k, v, bias, out, scratch = (bound[n] for n in ("q", "k", "v", "bias", "out", "scratch"))
                S, hd = int(bound["S"]), int(bound["hd"])
                nh, max_len = k.shape[0], k.shape[1]
                chunks = -(-S // gpu_kernels.ATTENTION_CHUNK)
                assert grid == (nh, chunks) and block == (gpu_kernels.ATTENTION_CHUNK,) and shared_mem == 0
                assert q.shape == out.shape == (nh, hd) and k.shape == v.shape == (nh, max_len, hd) and S <= max_len
                assert int(bound["head_stride"]) == max_len * hd and float(bound["sqrt_hd"]) == np.float32(hd ** 0.5)
                heads = nh if int(bound["bias_head_stride"]) == S else 1
                assert bias.shape == (heads, S) and int(bound["bias_head_stride"]) in (S, 0)
                m, l, o = gpu_kernels.attention_chunks(strict_xp, q, k[:, :S], v[:, :S], bias, hd ** 0.5)
                if chunks == 1:
                    out[...] = gpu_kernels.flush(o[:, 0] / l[:, 0, None])
                else:
                    assert scratch.shape == (nh, chunks, hd + 2)
                    scratch[:, :, 0], scratch[:, :, 1], scratch[:, :, 2:] = m, l, o
                return
            rows, n_pad = int(bound["rows"]), int(bound["n_pad"])
            if name.startswith("matvec"):
                assert block == (gpu_kernels.MATVEC_THREADS,)
                rows_per_block = gpu_kernels.MATVEC_ROWS_PER_BLOCK
                assert grid[0] * rows_per_block >= rows > (grid[0] - 1) * rows_per_block
                assert bound["x"].size == n_pad and bound["y"].size == rows
                if name.startswith("matvec_f16"):
                    def product(suffix=""):
                        assert bound["wt" + suffix].shape == (rows, n_pad)
                        return gpu_kernels.matvec_f16(strict_xp, bound["wt" + suffix], bound["x"])
                else:
                    def product(suffix=""):
                        twin = gpu_kernels.matvec_q8_0 if name.startswith("matvec_q8_0") else gpu_kernels.matvec_q4_0
                        q, d = bound["q" + suffix], bound["d" + suffix]
                        assert q.shape[0] == d.shape[0] == rows and d.shape[1] == n_pad // 32
                        return twin(strict_xp, q, d, bound["x"])
                if name.endswith("_add"):
                    assert bound["r"].shape == (rows,)
                    bound["y"][...] = gpu_kernels.add_residual(bound["r"], product())
                elif name.endswith("_swiglu"):
                    bound["y"][...] = gpu_kernels.silu_mul_f32(strict_xp, product(), product("_up"))
                else:
                    bound["y"][...] = product()
            else:
                words = rows * n_pad // (4 if "q8_0" in name else 8)
                assert block == (gpu_kernels.DEQUANTIZE_THREADS,) and 0 < grid[0] <= 65536
                assert grid[0] * block[0] >= min(words, 65536 * block[0])
                assert bound["out"].shape == (rows, n_pad)
                twin = gpu_kernels.dequantize_q8_0 if "q8_0" in name else gpu_kernels.dequantize_q4_0
                bound["out"][...] = twin(strict_xp, bound["q"], bound["d"], bound["out"].dtype)
        return kernel

    return {name: launch(name) for name in gpu_kernels.KERNEL_NAMES}


@pytest.mark.parametrize("bits", [8, 4, 16])
@pytest.mark.parametrize("rows", [1, 8, 13])
def test_kernel_launches_match_the_cuda_signatures(bits, rows):
    qweight, scales = random_weight(bits, rows, 100, bits)
    x = np.random.default_rng(4).standard_normal((3, 100)).astype(np.float32)
    plain = DeviceQuantizedWeight(strict_xp, strict_xp.asarray(qweight),
                                  None if scales is None else strict_xp.asarray(scales), bits, 100, np.float32)
    launched = DeviceQuantizedWeight(strict_xp, plain.qweight, plain.scales, bits, 100, np.float32, fake_kernels())
    for T in (1, 3):                                   # the matvec kernel, then dequantize + matmul
        np.testing.assert_array_equal(launched.matmul(strict_xp.asarray(x[:T])).get(),
                                      plain.matmul(strict_xp.asarray(x[:T])).get())
    for dtype in (np.float32, np.float16):
        np.testing.assert_array_equal(launched.expanded(dtype).get(), plain.expanded(dtype).get())


# --- decode attention and CUDA-graph steps --------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(nh=st.integers(1, 5), S=st.integers(1, 600), hd=st.sampled_from([8, 16, 100, 128, 256]),
       bias_per_head=st.booleans(), dtype=st.sampled_from([np.float16, np.float32]), seed=st.integers(0, 2 ** 32 - 1))
def test_attention_decode_twin_is_one_tokens_attention(nh, S, hd, bias_per_head, dtype, seed):
    from bcnp.forward import attention
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((nh, hd)).astype(np.float32)
    k, v = (rng.standard_normal((nh, S, hd)).astype(dtype) for _ in range(2))
    bias = rng.standard_normal((nh if bias_per_head else 1, S)).astype(np.float32)
    bias[:, rng.integers(1, S + 1):] = -np.inf                       # masked slots past the token, never all
    got = gpu_kernels.attention_decode(np, q, k, v, bias, hd ** 0.5)
    want = attention(np, q[:, None].astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                     bias[:, None].astype(np.float64))[:, 0]
    assert got.dtype == np.float32 and got.shape == (nh, hd)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decode_kernel_launches_match_the_cuda_signatures(fixture_model, dtype):
    model, golden = fixture_model
    twin = to_device(model, xp=strict_xp, dtype=dtype)
    launched = to_device(model, xp=strict_xp, dtype=dtype)
    names = []
    launched.kernels = fake_kernels(names)             # attention, norms, silu * up, cache stores by kernel
    prompt = golden["prompt_2"]
    np.testing.assert_array_equal(prefill_then_decode(launched, prompt), prefill_then_decode(twin, prompt))
    suffix = "f16" if dtype == "float16" else "f32"
    # float32 weights are plain arrays: silu(gate) * up has its own kernel; float16 ones fuse it into the matvec
    assert set(names) == {f"attention_decode_{suffix}", f"kv_store_{suffix}", "rms_norm_f32"} | (
        {"silu_mul_f32"} if dtype == "float32" else set())


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_fused_matvec_launches_match_the_cuda_signatures(fixture_model, bits):
    """With device weights, DecodeOps adds the residuals inside o_proj's and down_proj's matvecs and runs
    gate_proj, up_proj and silu(gate) * up as one kernel."""
    model, golden = fixture_model
    cpu = model if bits == 16 else model.quantize(bits)
    twin = to_device(cpu, xp=strict_xp)
    launched = to_device(cpu, xp=strict_xp)
    names = []
    kernels = fake_kernels(names)
    launched.kernels = kernels
    for weight in launched.w.values():
        if isinstance(weight, DeviceQuantizedWeight):
            weight.kernels = kernels
    prompt = golden["prompt_2"]
    np.testing.assert_array_equal(prefill_then_decode(launched, prompt), prefill_then_decode(twin, prompt))
    kind = "f16" if bits == 16 else f"q{bits}_0"
    assert {f"matvec_{kind}", f"matvec_{kind}_add", f"matvec_{kind}_swiglu", "attention_decode_f16",
            "kv_store_f16", "rms_norm_f32"} <= set(names) and "silu_mul_f32" not in names


def test_the_device_decode_is_the_one_decoder_layer_with_its_own_ops(fixture_model, monkeypatch):
    """bcnp.gpu has no layer of its own: prefill runs bcnp.forward.decoder_layer with the plain ops, a one-token
    step runs the same function with DecodeOps (its kernels)."""
    import bcnp.forward
    model, golden = fixture_model
    device = to_device(model.quantize(8), xp=strict_xp)
    layer, ops = bcnp.forward.decoder_layer, []

    def recording(*args):
        ops.append(type(args[8]).__name__)
        return layer(*args)
    monkeypatch.setattr(bcnp.forward, "decoder_layer", recording)
    cache = device.new_cache(8)
    device.forward(golden["prompt_1"][:3], cache)
    device.forward([5], cache)
    layers = model.config.num_hidden_layers
    assert ops == ["Ops"] * layers + ["DecodeOps"] * layers


@pytest.mark.parametrize("S", [1, 256, 257, 700])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_long_attention_launches_a_chunk_per_256_keys_and_a_combine(S, dtype):
    rng = np.random.default_rng(S)
    nh, hd, max_len = 3, 24, 704
    k, v = (strict_xp.asarray(rng.standard_normal((2, nh, max_len, hd)).astype(dtype)) for _ in range(2))
    q = strict_xp.asarray(rng.standard_normal((nh, 1, hd)).astype(np.float32))
    bias = strict_xp.asarray(rng.standard_normal((nh, 1, S)).astype(np.float32))
    names = []
    launched = DeviceKVCache(k, v, kernels=fake_kernels(names)).attend(strict_xp, 1, q, bias)
    twin = DeviceKVCache(k, v).attend(strict_xp, 1, q, bias)
    np.testing.assert_array_equal(launched.get(), twin.get())
    suffix = "f16" if dtype == np.float16 else "f32"
    assert names == [f"attention_decode_{suffix}"] + (["attention_combine"] if S > 256 else [])


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 3), n=st.integers(1, 700), seed=st.integers(0, 2 ** 32 - 1))
def test_rms_norm_and_silu_twins_compute_what_the_model_does(T, n, seed):
    from bcnp.forward import rms_norm, silu
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((T, n)) * rng.uniform(0.01, 100)).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, n).astype(np.float32)
    got = gpu_kernels.rms_norm_f32(np, x, weight, 1e-6)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, rms_norm(np, x.astype(np.float64), weight, 1e-6), rtol=2e-6, atol=1e-7)
    gate, up = (rng.standard_normal((2, T, n)) * 8).astype(np.float32)
    np.testing.assert_allclose(gpu_kernels.silu_mul_f32(np, gate, up), silu(np, gate.astype(np.float64)) * up,
                               rtol=2e-6, atol=1e-30)


def test_a_failed_capture_falls_back_to_op_by_op_with_one_warning(fixture_model):
    model, golden = fixture_model
    device = to_device(model.quantize(8), xp=strict_xp)
    assert device.graphs                               # every linear in bcnp's kernels: graphs are on

    class RefusingStream:                              # a driver that invalidates the capture
        def begin_capture(self):
            pass

        def end_capture(self):
            raise RuntimeError("cudaErrorStreamCaptureInvalidated: operation failed due to a previous error\n...")

    decoder = DecodeGraphs(device)
    decoder.stream = RefusingStream()
    with pytest.warns(RuntimeWarning, match=r"^CUDA graph capture failed, decoding without graphs: "
                                            r"cudaErrorStreamCaptureInvalidated: operation failed[^\n]*$"):
        decoder._capture(device.new_cache(8), 8, pool=None)
    assert not device.graphs and decoder.graphs == {}


class FakeCuda:
    """Just enough of cupy.cuda for DecodeGraphs on the strict module: streams that 'capture' by running the
    step and remember which allocator was in force, memory pools, using_allocator. No arithmetic is recorded:
    a replayed step returns the logits of its capture (the tests here look at memory, not values)."""

    def __init__(self):
        self.allocators = [None]                          # the allocator stack of using_allocator
        self.pools = []

    def MemoryPool(self):
        pool = types.SimpleNamespace(malloc=lambda size: None)
        self.pools.append(pool)
        return pool

    def using_allocator(self, allocator):
        import contextlib

        @contextlib.contextmanager
        def context():
            self.allocators.append(allocator)
            try:
                yield
            finally:
                self.allocators.pop()
        return context()

    def get_current_stream(self):
        return types.SimpleNamespace(record=lambda: None)

    def Stream(self, non_blocking=False):
        cuda = self

        class Stream:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def wait_event(self, event):
                pass

            def begin_capture(self):
                self.capture_allocator = cuda.allocators[-1]

            def end_capture(self):
                return types.SimpleNamespace(allocator=self.capture_allocator, launches=[],
                                             launch=lambda stream, g=None: None)
        return Stream()


def test_each_graph_allocates_from_a_pool_of_its_own_that_it_keeps(fixture_model, monkeypatch):
    """The CUDA graphs write to the buffers their capture allocated: those must come from a pool that nothing else
    allocates from and nothing frees (not CuPy's default pool, whose free_all_blocks() would release them)."""
    monkeypatch.setattr(DecodeGraphs, "WINDOW", 4)
    cuda = FakeCuda()
    monkeypatch.setattr(strict_xp, "cuda", cuda, raising=False)
    model, golden = fixture_model
    device = to_device(model.quantize(8), xp=strict_xp)
    cache = device.new_cache(12)
    device.forward(golden["prompt_1"][:3], cache)                  # prefill: the default allocator
    assert cuda.pools == []
    decoder = cache.decoder = DecodeGraphs(device)
    decoder.stream = cuda.Stream()
    for token in golden["prompt_1"][3:7]:                          # positions 3 | 4 5 6: windows 4 and 8
        device.forward([token], cache)
    assert sorted(decoder.graphs) == [4, 8] and len(cuda.pools) == 2
    for window, (graph, logits, pool) in decoder.graphs.items():
        assert graph.allocator == pool.malloc                     # captured while allocating from its own pool
    assert decoder.graphs[4][2] is not decoder.graphs[8][2]
    assert cuda.allocators == [None]                               # and back to the default allocator after


def test_a_dropped_cache_frees_its_decode_graphs_without_the_cycle_collector(fixture_model):
    """cache.decoder -> DecodeGraphs -> no cache: nothing to wait for the cycle collector (a 13B cache is 3.4 GB)."""
    import gc
    import weakref
    model, golden = fixture_model
    device = to_device(model.quantize(8), xp=strict_xp)

    def decoders_alive():
        return sum(isinstance(o, DecodeGraphs) for o in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        before = decoders_alive()
        cache = device.new_cache(8)
        device.forward(golden["prompt_1"][:2], cache)
        device.forward([5], cache)
        decoder, k = weakref.ref(cache.decoder), weakref.ref(cache)
        del cache
        assert decoder() is None and k() is None
        for _ in range(3):                                         # what repeated chats do
            assert len(list(device.generate(golden["prompt_1"], max_new_tokens=3, do_sample=False))) <= 3
        # the model's engine keeps the last finished cache (the next chat turn's prefix), and only that one
        assert decoders_alive() <= before + 1
    finally:
        gc.enable()


def decode_one_at_a_time(model, prompt, split, cache):
    return np.concatenate([model.forward(prompt[:split], cache)] + [model.forward([t], cache) for t in prompt[split:]])


@pytest.mark.parametrize("window", [1, 4, 7, 256])
def test_graph_steps_on_the_strict_module_decode_as_the_cpu_does(fixture_model, monkeypatch, window):
    """The fixed-shape step a CUDA graph records: position read from the device, a window of positions attended
    with the ones past the token masked, windows changing as the cache fills, the last cut short by its end."""
    monkeypatch.setattr(DecodeGraphs, "WINDOW", window)
    model, golden = fixture_model
    prompt = golden["prompt_2"]
    device = to_device(model, xp=strict_xp, dtype="float32")
    assert not device.graphs                           # float32 linears multiply in cuBLAS: not captured
    cache = device.new_cache(len(prompt) + 3)
    cache.k[...] = 7.0                                 # stale values in the slots not yet written must not matter
    cache.v[...] = -3.0
    got = decode_one_at_a_time(device, prompt, 5, cache)
    assert cache.length == len(prompt) and isinstance(cache.decoder, DecodeGraphs)
    want = decode_one_at_a_time(model, prompt, 5, model.new_cache(len(prompt) + 3))
    assert scaled_error(got, want) <= 1e-5
    assert scaled_error(got, golden["logits_full_2"]) <= 1e-4
    tokens = list(device.generate(golden["prompt_1"], max_new_tokens=20, do_sample=False, repetition_penalty=1.0))
    assert tokens == golden["greedy_tokens_1"].tolist()
    device.forward([1, 2, 3], cache)                   # fills the context
    with pytest.raises(ValueError, match="exceed the context of"):
        device.forward([4], cache)


NO_NVCC = pytest.mark.skipif(shutil.which("nvcc") is None,
                             reason="nvcc is not installed, so the CUDA source cannot be compiled on this machine "
                                    "(CuPy compiles it with NVRTC at run time on a GPU machine)")
CUPY_FLAGS_FOR_NVCC = gpu_kernels.NVRTC_OPTIONS + ("-ftz=true",)     # what CuPy passes that nvcc also understands


def nvcc(tmp_path, arch, output):
    out = tmp_path / f"quant_kernels.{output}"
    result = subprocess.run(["nvcc", *CUPY_FLAGS_FOR_NVCC, f"-arch={arch}", f"--{output}", "-Werror", "all-warnings",
                             "-o", str(out), gpu_kernels.KERNEL_SOURCE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out.read_bytes()


@NO_NVCC
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_source_compiles_with_nvcc(tmp_path, arch):
    binary = nvcc(tmp_path, arch, "cubin")
    for name in gpu_kernels.KERNEL_NAMES:
        assert name.encode() in binary


@NO_NVCC
def test_with_cupys_flags_every_float32_operation_flushes_subnormals(tmp_path):
    """Why the twins flush: compiled as CuPy compiles it (-ftz=true, for an H100/H200), every float32 add,
    multiply, divide, square root, FMA, max and exp2 in the PTX is the .ftz form; no IEEE-subnormal one is left."""
    ptx = nvcc(tmp_path, "sm_90", "ptx").decode()
    float_ops = re.findall(r"\b(?:add|sub|mul|div|sqrt|fma|max|min|ex2)(?:\.(?:rn|rm|rz|rp|approx|full))*"
                           r"(?:\.ftz)?(?:\.sat)?\.f32\b", ptx)
    assert len(float_ops) > 1000
    assert [op for op in float_ops if ".ftz" not in op] == []
    # the float16 conversions are inline PTX, untouched by -ftz: float16 subnormals convert exactly
    assert "cvt.f32.f16" in ptx and "cvt.ftz.f32.f16" not in ptx


def nvrtc_library():
    """libnvrtc from the system, a CUDA toolkit or the pip wheel nvidia-cuda-nvrtc-cu12/-cu13 (what CuPy loads)."""
    import ctypes.util
    import glob
    import importlib.util
    places = ["/usr/local/cuda*/lib*/libnvrtc.so*"]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        places += [f"{root}/cuda_nvrtc/lib/libnvrtc.so*", f"{root}/cu13/lib/libnvrtc.so*"]
    found = [path for place in places for path in sorted(glob.glob(place)) if ".alt." not in path]
    return ctypes.util.find_library("nvrtc") or (found[0] if found else None)


@pytest.mark.skipif(nvrtc_library() is None, reason="NVRTC (libnvrtc) is not installed on this machine")
def test_cuda_source_compiles_with_nvrtc_as_cupy_compiles_it():
    """CuPy compiles the kernels at run time with NVRTC, which has no system headers: compile the file the same
    way (the options gpu_kernels.cuda_kernels passes, then CuPy's own, for an sm_90 GPU: a CUBIN) and find every
    kernel in it."""
    import ctypes
    nvrtc = ctypes.CDLL(nvrtc_library())
    program = ctypes.c_void_p()
    source = kernel_source().encode()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source, b"quant_kernels.cu", 0, None, None) == 0
    options = [o.encode() for o in gpu_kernels.NVRTC_OPTIONS + gpu_kernels.CUPY_NVRTC_OPTIONS + ("-arch=sm_90",)]
    status = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    assert status == 0, log.value.decode(errors="replace")
    assert nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size)) == 0
    cubin = ctypes.create_string_buffer(size.value)
    assert nvrtc.nvrtcGetCUBIN(program, cubin) == 0
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    for name in gpu_kernels.KERNEL_NAMES:
        assert name.encode() in cubin.raw, name


def test_gpu_bench_runs_end_to_end_on_numpy():
    """tools/gpu_bench.py --smoke: the benchmark's code path with NumPy and tiny sizes, so the one GPU run a
    session may get is not spent on a bug in the script."""
    root = FIXTURES.parent.parent
    result = subprocess.run([sys.executable, str(root / "tools" / "gpu_bench.py"), "--smoke", "--layers", "1,2",
                             "--tokens", "2", "--prompt", "8"], capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr
    table = result.stdout.splitlines()[-5:]
    assert table[0].split()[:5] == ["mode", "GB/token", "tok/s", "roofline", "ratio"]
    assert [line.split()[0] for line in table[1:4]] == ["fp16", "int8", "int4"]
    result = subprocess.run(["bash", "-n", str(root / "tools" / "gpu_check.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- on a GPU ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cupy():
    try:
        return gpu_kernels.get_cupy()
    except BackendError as e:
        pytest.skip(f"no GPU here: {e}")


@pytest.mark.gpu
def test_gpu_float32_matches_the_original(cupy, fixture_model):
    model, golden = fixture_model
    device = to_device(model, dtype="float32")
    assert device.xp is cupy
    for i in range(3):
        assert scaled_error(device.logits(golden[f"prompt_{i}"]), golden[f"logits_full_{i}"]) <= 1e-4
    cache = device.new_cache()
    incremental = np.concatenate([device.forward([t], cache) for t in golden["prompt_2"]])
    assert scaled_error(incremental, golden["logits_incr_2"]) <= 1e-4
    assert scaled_error(prefill_then_decode(device, golden["prompt_2"]), golden["logits_prefill_decode_2"]) <= 1e-4
    for i in (1, 2):
        tokens = list(device.generate(golden[f"prompt_{i}"], max_new_tokens=20, do_sample=False,
                                      repetition_penalty=1.0))
        assert tokens == golden[f"greedy_tokens_{i}"].tolist()


@pytest.mark.gpu
def test_gpu_float16_is_within_the_float16_tolerance(cupy, fixture_model):
    model, golden = fixture_model
    device = model.cuda()
    assert device.new_cache(4).k.dtype == np.float16
    for i in range(3):
        assert scaled_error(device.logits(golden[f"prompt_{i}"]), golden[f"logits_full_{i}"]) <= 1e-2
    assert scaled_error(prefill_then_decode(device, golden["prompt_2"]), golden["logits_prefill_decode_2"]) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_quantized_decode_matches_prefill_and_the_cpu(cupy, fixture_model, bits):
    model, golden = fixture_model
    prompt = golden["prompt_2"]
    cpu = model.quantize(bits)
    want = cpu.logits(prompt)
    exact = to_device(cpu, dtype="float32")
    assert scaled_error(exact.logits(prompt), want) <= 1e-5
    assert scaled_error(prefill_then_decode(exact, prompt), want) <= 1e-5
    half = cpu.cuda()
    assert scaled_error(half.logits(prompt), want) <= 1e-2
    assert scaled_error(prefill_then_decode(half, prompt), want) <= 1e-2
    back = half.cpu()
    np.testing.assert_array_equal(back.w["lm_head.weight"].qweight, cpu.w["lm_head.weight"].qweight)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4, 16])
@pytest.mark.parametrize("rows, in_features", [(7, 172), (1000, 5120), (257, 13696)])
def test_gpu_kernels_match_their_twins(cupy, bits, rows, in_features):
    qweight, scales = random_weight(rows + bits, rows, in_features, bits)
    n_pad = qweight.shape[1] * (2 if bits == 4 else 1)
    x = np.zeros(n_pad, np.float32)
    x[:in_features] = np.random.default_rng(3).standard_normal(in_features)
    kernels = gpu_kernels.cuda_kernels(cupy)
    device = DeviceQuantizedWeight(cupy, cupy.asarray(qweight), None if scales is None else cupy.asarray(scales),
                                   bits, in_features, np.float16, kernels)
    y = device.matvec(cupy.asarray(x)).get()
    want = twin_matvec(np, qweight, scales, bits, x)
    # the same float32 operations in the same order: equal up to the last bit, allowed one ulp of the sum
    assert np.abs(y - want).max() <= 1e-6 * max(1.0, float(np.abs(want).max())), np.abs(y - want).max()
    residual = np.random.default_rng(5).standard_normal(rows).astype(np.float32)
    y_add = device.matvec(cupy.asarray(x), residual=cupy.asarray(residual)).get()
    np.testing.assert_array_equal(y_add, residual + y)                   # the same sum, then one float32 add
    up_q, up_s = random_weight(rows + bits + 1, rows, in_features, bits)
    up = DeviceQuantizedWeight(cupy, cupy.asarray(up_q), None if up_s is None else cupy.asarray(up_s), bits,
                               in_features, np.float16, kernels)
    fused = device.swiglu(up, cupy.asarray(x)).get()
    want = gpu_kernels.silu_mul_f32(np, y, up.matvec(cupy.asarray(x)).get())
    np.testing.assert_allclose(fused, want, rtol=1e-6, atol=1e-30)        # expf against NumPy's exp
    if bits != 16:
        twin = gpu_kernels.dequantize_q8_0 if bits == 8 else gpu_kernels.dequantize_q4_0
        for dtype in (np.float32, np.float16):
            np.testing.assert_array_equal(device.expanded(dtype).get(), twin(np, qweight, scales, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("bits, dtype", [(16, "float16"), (8, "float16"), (4, "float32")])
def test_gpu_graph_decode_replays_what_eager_decode_computes(cupy, fixture_model, monkeypatch, bits, dtype):
    import warnings
    monkeypatch.setattr(DecodeGraphs, "WINDOW", 8)
    model, golden = fixture_model
    prompt = golden["prompt_2"]
    cpu = model if bits == 16 else model.quantize(bits)
    graphs, eager = to_device(cpu, dtype=dtype), to_device(cpu, dtype=dtype)
    assert graphs.graphs
    eager.graphs = False
    cache = graphs.new_cache(len(prompt) + 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # a capture that fails and falls back fails here
        replayed = decode_one_at_a_time(graphs, prompt, 5, cache)
    assert graphs.graphs and len(cache.decoder.graphs) == -(-len(prompt) // 8)
    np.testing.assert_array_equal(replayed, decode_one_at_a_time(eager, prompt, 5, eager.new_cache(len(prompt) + 3)))
    assert scaled_error(replayed, cpu.logits(prompt)) <= (1e-5 if dtype == "float32" else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("S, hd, bias_per_head", [(1, 128, True), (37, 16, False), (257, 128, True), (3000, 128, True)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_gpu_attention_kernel_matches_its_twin(cupy, S, hd, bias_per_head, dtype):
    rng = np.random.default_rng(S)
    nh, max_len = 5, S + 9
    q = rng.standard_normal((nh, 1, hd)).astype(np.float32)
    k, v = (rng.standard_normal((2, nh, max_len, hd)).astype(dtype) for _ in range(2))
    bias = rng.standard_normal((nh if bias_per_head else 1, 1, S)).astype(np.float32)
    bias[..., S // 2 + 1:] = -np.inf
    cache = DeviceKVCache(cupy.asarray(k), cupy.asarray(v), kernels=gpu_kernels.cuda_kernels(cupy))
    got = cache.attend(cupy, 1, cupy.asarray(q), cupy.asarray(bias)).get()[:, 0]
    want = gpu_kernels.attention_decode(np, q[:, 0], k[1, :, :S], v[1, :, :S], bias[:, 0], hd ** 0.5)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))


@pytest.mark.gpu
@pytest.mark.parametrize("T, n", [(1, 5120), (3, 64), (1, 13696)])
def test_gpu_norm_silu_and_store_kernels_match_their_twins(cupy, T, n):
    kernels = gpu_kernels.cuda_kernels(cupy)
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((T, n)) * 3).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, n).astype(np.float32)
    got = gpu_kernels.rms_norm_on_device(cupy, kernels, cupy.asarray(x), cupy.asarray(weight), 1e-6).get()
    np.testing.assert_array_equal(got, gpu_kernels.rms_norm_f32(np, x, weight, 1e-6))      # IEEE ops, same order
    up = rng.standard_normal((T, n)).astype(np.float32)
    got = gpu_kernels.silu_mul_on_device(cupy, kernels, cupy.asarray(x), cupy.asarray(up)).get()
    np.testing.assert_allclose(got, gpu_kernels.silu_mul_f32(np, x, up), rtol=1e-6, atol=1e-30)   # expf vs exp
    for dtype in (np.float16, np.float32):
        nh, hd, max_len, position = 5, 128, 40, 17
        k, v = (rng.standard_normal((1, nh, hd)).astype(np.float32) for _ in range(2))
        cache = GraphKVCache(cupy.zeros((2, nh, max_len, hd), dtype), cupy.zeros((2, nh, max_len, hd), dtype),
                                     kernels=kernels, position=cupy.asarray([position], dtype=cupy.int64), window=32)
        cache.store(1, cupy.asarray(k), cupy.asarray(v))
        want = np.zeros((2, nh, max_len, hd), dtype)
        want[1, :, position] = k[0].astype(dtype)
        np.testing.assert_array_equal(cache.k.get(), want)
        want[1, :, position] = v[0].astype(dtype)
        np.testing.assert_array_equal(cache.v.get(), want)


@pytest.mark.gpu
def test_gpu_graphs_survive_free_all_blocks_and_other_allocations(cupy, fixture_model, monkeypatch):
    """The graphs' buffers live in pools of their own: the default pool's free_all_blocks() (the benchmark calls
    it; CuPy does on an out-of-memory) and new arrays of every size must not touch them."""
    monkeypatch.setattr(DecodeGraphs, "WINDOW", 8)
    model, golden = fixture_model
    prompt = golden["prompt_2"]
    graphs, eager = to_device(model.quantize(8)), to_device(model.quantize(8))
    eager.graphs = False
    want = decode_one_at_a_time(eager, prompt, 5, eager.new_cache(len(prompt) + 3))
    cache = graphs.new_cache(len(prompt) + 3)
    got = [graphs.forward(prompt[:5], cache)]
    for token in prompt[5:]:
        got.append(graphs.forward([token], cache))
        cupy.get_default_memory_pool().free_all_blocks()
        junk = [cupy.full(n, cupy.nan, cupy.float32) for n in (64, 4096, 1 << 16, 1 << 20)]     # noqa: F841
    assert graphs.graphs and len(cache.decoder.graphs) == -(-len(prompt) // 8)
    np.testing.assert_array_equal(np.concatenate(got), want)


@pytest.mark.gpu
def test_gpu_float16_overflow_is_clamped_in_the_cache_and_recomputed_in_prefill(cupy, fixture_model):
    model, golden = fixture_model
    prompt = golden["prompt_2"]
    half = to_device(with_huge_attention_inputs(model))
    cache = half.new_cache(len(prompt))
    got = np.concatenate([half.forward(prompt[:26], cache)] + [half.forward([t], cache) for t in prompt[26:]])
    assert np.isfinite(got).all()
    for stored in (cache.k.get(), cache.v.get()):
        assert np.abs(stored.astype(np.float32)).max() == 65504
    twin = to_device(with_huge_attention_inputs(model), xp=strict_xp)
    assert scaled_error(got, prefill_then_decode(twin, prompt)) <= 1e-2
