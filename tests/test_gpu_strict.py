"""The whole forward pass through `to_device(model, xp=strict_xp)`, without a GPU: an array module that refuses
implicit conversions to NumPy as CuPy does, the CUDA kernels replaced by their NumPy twins (tests/conftest.py);
moving a model there and back (bcnp.api.to_device / to_host); asking for CUDA without CuPy or a device.
"""
import sys
import types

import numpy as np
import pytest

import strict_xp
from bcnp import Model
from bcnp.api import to_device, to_host
from bcnp.gpu.kernels import BackendError
from bcnp.gpu.weights import DeviceQuantizedWeight
from bcnp.tensor import Tensor
from bcnp.quant import QuantizedWeight
from conftest import FIXTURES, MODELS, dequantized, prefill_then_decode, scaled_error, with_huge_attention_inputs

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
    want = dequantized(cpu).logits(prompt)               # dequantized float32 weights, BLAS: the exact reference
    device = to_device(cpu, xp=strict_xp, dtype="float32")
    assert scaled_error(device.logits(prompt), want) <= 1e-5
    # one token at a time runs the matvec twins (the CPU's own kernels round x per block: not the reference here)
    assert scaled_error(prefill_then_decode(device, prompt), want) <= 1e-5
    half = to_device(cpu, xp=strict_xp)
    assert scaled_error(half.logits(prompt), want) <= 1e-2
    assert scaled_error(prefill_then_decode(half, prompt), want) <= 1e-2


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
