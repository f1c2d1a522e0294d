"""On a GPU (marker gpu; skipped without CuPy and a device): the golden fixtures on CuPy, the kernels against
their twins, decode against prefill, graph replay against eager decode.
"""
import numpy as np
import pytest

import strict_xp
from bcnp.api import to_device
from bcnp.gpu import kernels as gpu_kernels
from bcnp.gpu.cache import DeviceKVCache, GraphKVCache
from bcnp.gpu.graphs import DecodeGraphs
from bcnp.gpu.kernels import BackendError
from bcnp.gpu.weights import DeviceQuantizedWeight
from conftest import (decode_one_at_a_time, dequantized, prefill_then_decode, random_weight, scaled_error,
                      twin_matvec, with_huge_attention_inputs)


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
    want = dequantized(cpu).logits(prompt)     # the device multiplies the dequantized weights by x in float
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
    reference = cpu if bits == 16 else dequantized(cpu)     # the device multiplies in float: no rounding of x
    assert scaled_error(replayed, reference.logits(prompt)) <= (1e-5 if dtype == "float32" else 1e-2)


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
