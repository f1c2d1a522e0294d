"""The GPU decode step without a GPU: decode attention, the fused launches against the CUDA signatures, the one
`decoder_layer` with the device's ops, and CUDA-graph capture and replay (bcnp.gpu.graphs) with a fake CUDA.
"""
import types

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import strict_xp
from bcnp.api import to_device
from bcnp.gpu import kernels as gpu_kernels
from bcnp.gpu.cache import DeviceKVCache
from bcnp.gpu.graphs import DecodeGraphs
from bcnp.gpu.weights import DeviceQuantizedWeight
from conftest import decode_one_at_a_time, fake_kernels, prefill_then_decode, scaled_error

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
    gate_proj, up_proj and silu(gate) * up as one kernel: every token decoded through the launches gets the
    twins' bits. A prefill multiplies by cuBLAS instead, not a launch: here NumPy's float16 matmul, whose sums
    are not the twin's float32 BLAS sums in the same order (on a Zen 5 they differ in the last float16 bit), so
    prefill then decode is compared to float16 rounding."""
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
    np.testing.assert_array_equal(decode_one_at_a_time(launched, prompt, 1, launched.new_cache()),
                                  decode_one_at_a_time(twin, prompt, 1, twin.new_cache()))
    assert scaled_error(prefill_then_decode(launched, prompt), prefill_then_decode(twin, prompt)) <= 2e-3
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
