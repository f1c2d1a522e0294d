"""Quantized models on the fixtures: how close int8/int4 stay to the float model (and to the original's own int8),
and that every way of getting a quantized model computes the same thing."""
import math
import tracemalloc

import numpy as np
import pytest

from bcnp import Model
from bcnp.convert import convert
from bcnp.quant import QuantizedWeight
from conftest import FIXTURES

B13 = FIXTURES / "b13-alibi-h8-l4-bf16"
B7 = FIXTURES / "b7-rope-h4-l3-fp16"


def max_abs(a, b):
    return float(np.abs(a - b).max())


def top1_agreement(a, b):
    return float(np.mean(a.argmax(-1) == b.argmax(-1)))


@pytest.fixture(scope="module")
def b13():
    return Model.from_pretrained(B13 / "hf"), np.load(B13 / "golden.npz")


@pytest.fixture(scope="module", params=[8, 4])
def quantized_b13(request, b13):
    model, golden = b13
    return request.param, model.quantize(request.param), golden


def test_every_linear_is_quantized_lm_head_at_8_bits_embedding_float16(quantized_b13):
    """...and every linear rounds x alike: to int16 in an int8 model, to int8 in an int4 one (its lm_head too)."""
    bits, q, _ = quantized_b13
    for name, w in q.w.items():
        if name == "lm_head.weight":
            assert isinstance(w, QuantizedWeight) and w.bits == 8 and w.x_bits == {8: 16, 4: 8}[bits]
        elif name.endswith(("W_pack.weight", "o_proj.weight", "gate_proj.weight", "up_proj.weight",
                            "down_proj.weight")):
            assert isinstance(w, QuantizedWeight) and w.bits == bits and w.x_bits == {8: 16, 4: 8}[bits], name
        elif name == "model.embed_tokens.weight":
            assert w.dtype == np.float16
        else:
            assert w.dtype == np.float32 and w.ndim == 1, name       # the norms


def rms(a):
    return float(np.sqrt(np.mean(np.square(a))))


def test_int8_is_at_least_as_close_to_float_as_the_originals_per_row_int8(b13):
    """Like for like: the original's int8 quantizes the decoder layers' linears and leaves lm_head in float, so
    this comparison does too (bcnp's default also puts lm_head at 8 bits; see the next test). Closeness is the
    RMS of Δlogit over all positions and the vocabulary; max |Δlogit| of a single logit is printed as well."""
    model, golden = b13
    q8 = model.quantize(8)
    q8.w["lm_head.weight"] = model.w["lm_head.weight"]
    for i in range(3):
        prompt, want = golden[f"prompt_{i}"], golden[f"logits_full_{i}"]
        cache = q8.new_cache()
        decoded = np.concatenate([q8.forward([t], cache) for t in prompt])    # the decode kernels
        for name, ours in (("prefill", q8.logits(prompt)), ("decode", decoded)):
            original = golden[f"int8_logits_full_{i}"]
            print(f"prompt {i} {name}: rms {rms(ours - want):.5f} (original {rms(original - want):.5f}), "
                  f"max {max_abs(ours, want):.5f} (original {max_abs(original, want):.5f})")
            assert rms(ours - want) <= rms(original - want), f"prompt {i}, {name}"
            assert top1_agreement(ours, want) >= top1_agreement(original, want)


@pytest.mark.parametrize("bits, max_error, min_top1", [(8, 0.02, 0.9), (4, 0.3, 0.7)])
def test_quantized_logits_stay_close_to_float(b13, bits, max_error, min_top1):
    """The numbers the closing note reports (int8 / int4 vs float32 on the 33-token prompt)."""
    model, golden = b13
    logits = model.quantize(bits).logits(golden["prompt_2"])
    assert max_abs(logits, golden["logits_full_2"]) <= max_error
    assert top1_agreement(logits, golden["logits_full_2"]) >= min_top1


def test_quantized_decode_agrees_with_quantized_prefill(quantized_b13):
    """Decode and prefill round the activation alike and add the same integer block products (on AVX-512 builds
    the same sums, bit for bit; elsewhere in another order), through another attention: they agree closely."""
    bits, q, golden = quantized_b13
    prompt = golden["prompt_2"]
    full = q.logits(prompt)
    cache = q.new_cache()
    steps = np.concatenate([q.forward(prompt[:26], cache)] + [q.forward([t], cache) for t in prompt[26:]])
    assert max_abs(steps, full) <= 1e-4
    assert top1_agreement(steps, full) == 1.0


def test_int8_x_in_an_int4_models_lm_head_costs_a_twentieth_of_what_int4_does(b13):
    """An int4 model rounds x to int8 for its 8-bit lm_head too (bcnp.layout.activation_bits): half the products
    of int16 x in a batch. Against int16 x there, its logits move by under 1/20 of int4's own error (RMS; measured
    0.027-0.031 of it on the three prompts, so under 0.1% more error in all, the two adding in quadrature) and the
    top token is the same everywhere."""
    model, golden = b13
    q4 = model.quantize(4)
    assert q4.w["lm_head.weight"].x_bits == 8
    for i in range(3):
        prompt, want = golden[f"prompt_{i}"], golden[f"logits_full_{i}"]
        ours = q4.logits(prompt)
        q4.w["lm_head.weight"] = q4.w["lm_head.weight"].with_x_bits(16)
        int16_x = q4.logits(prompt)
        q4.w["lm_head.weight"] = q4.w["lm_head.weight"].with_x_bits(8)
        print(f"prompt {i}: int8 x moves {rms(ours - int16_x):.5f}, int4 costs {rms(int16_x - want):.5f}")
        assert rms(ours - int16_x) <= rms(int16_x - want) / 20
        assert top1_agreement(ours, int16_x) == 1.0


@pytest.mark.parametrize("bits", [8, 4])
def test_converted_quantized_directory_equals_quantizing_in_memory(tmp_path, bits):
    for fixture in (B13, B7):
        out = convert(fixture / "hf", tmp_path / f"{fixture.name}-q{bits}", quantize_bits=bits, progress=False)
        from_disk = Model.from_pretrained(out)
        in_memory = Model.from_pretrained(fixture / "hf").quantize(bits)
        prompt = np.load(fixture / "golden.npz")["prompt_2"]
        # the converter stores the embedding as float16 like quantize(); everything else is bit-identical
        np.testing.assert_array_equal(from_disk.logits(prompt), in_memory.logits(prompt))
        w = from_disk.w["model.layers.0.mlp.down_proj.weight"]
        assert isinstance(w.qweight, np.memmap) or isinstance(w.qweight.base, np.memmap)   # mapped, not copied
        assert from_disk.w["lm_head.weight"].x_bits == in_memory.w["lm_head.weight"].x_bits == {8: 16, 4: 8}[bits]
        # quantizing an already-quantized model keeps its weights
        again = from_disk.quantize(bits)
        np.testing.assert_array_equal(again.logits(prompt), in_memory.logits(prompt))


def test_quantize_rejects_other_bit_widths(b13):
    with pytest.raises(ValueError, match="8 or 4"):
        b13[0].quantize(3)


def test_a_mapped_checkpoint_is_quantized_one_float_tensor_at_a_time():
    """from_pretrained maps the files and reads nothing; quantize reads, quantizes and drops one tensor at a time,
    so its peak is the quantized model plus about one float32 tensor (the bfloat16 13B, 26.5 GB, quantizes in
    little more than its 7.5 GB int4 size). Measured here: 67 kB to open, peak 1.0 MB = 0.65 MB quantized + 1.4
    float32 tensors of the largest size, against 3.7 MB for the float32 model."""
    tracemalloc.start()
    try:
        model = Model.from_pretrained(B13 / "hf")
        _, opened = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        quantized = model.quantize(4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    sizes = [4 * math.prod(shape) for shape in model.config.weight_shapes().values()]     # float32 bytes
    quantized_bytes = sum(w.nbytes for w in quantized.w.values())
    assert opened < sum(sizes) / 10
    assert peak < quantized_bytes + 2 * max(sizes) < sum(sizes), (peak, quantized_bytes, max(sizes))
