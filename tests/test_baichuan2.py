"""Baichuan2: NormHead applied once where weights are read, the family told and recorded, quantized Baichuan2.

The golden logits of the original Baichuan2 code (full, incremental, prefill + decode, hidden states, greedy)
are checked with v1's tests in test_model.py; the fixtures are tiny (vocab 512), so they pass family=."""
import io
import json
import types

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import strict_xp
from bcnp import Model
from bcnp.api import to_device
from bcnp.checkpoint import read_model_dir
from bcnp.convert import convert
from bcnp.convert import main as convert_main
from bcnp.inspect import main as inspect_main
from bcnp.quant import QuantizedWeight, dequantize
from bcnp.weights import norm_head
from conftest import FIXTURES

B2_13 = FIXTURES / "b2-13-alibi-h8-l4-bf16"
B2_7 = FIXTURES / "b2-7-rope-h4-l3-fp16"


def scaled_error(got, want):
    """SPEC §7: max |Δ| / max(1, max |logit|)."""
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


def top1_agreement(a, b):
    return float(np.mean(a.argmax(-1) == b.argmax(-1)))


@pytest.fixture(scope="module", params=[B2_13, B2_7], ids=lambda p: p.name)
def b2(request):
    return Model.from_pretrained(request.param / "hf", family="baichuan2"), np.load(request.param / "golden.npz")


# --- NormHead ------------------------------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(st.integers(1, 20), st.integers(1, 40), st.integers(0, 2**32 - 1), st.floats(1e-6, 1e3))
def test_norm_head_makes_every_row_a_unit_vector_of_the_same_direction(rows, cols, seed, scale):
    w = (scale * np.random.default_rng(seed).standard_normal((rows, cols))).astype(np.float32)
    w[0] = 0.0                                                     # a zero row stays zero (the 1e-12 floor)
    n = norm_head(w)
    assert n.dtype == np.float32 and np.all(n[0] == 0)
    np.testing.assert_allclose(np.linalg.norm(n[1:], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(n[1:] * np.linalg.norm(w[1:], axis=1, keepdims=True), w[1:], rtol=1e-4,
                               atol=1e-6 * scale)


def stored_tensor(path, name):
    """A tensor as the checkpoint stores it (bcnp.checkpoint), not as the model reads it."""
    return read_model_dir(path)[2][name]


def test_the_loaded_lm_head_is_normalised_and_the_stored_one_is_not(b2):
    model, _ = b2
    stored = stored_tensor(model.path, "lm_head.weight").float32()
    assert np.linalg.norm(stored, axis=1).max() > 0.3                # the fixtures' rows: norms 0.04 .. 0.76
    np.testing.assert_allclose(np.linalg.norm(model.w["lm_head.weight"], axis=1), 1.0, rtol=1e-6)


def test_forgetting_norm_head_fails_the_golden_logits(b2):
    """Read as Baichuan (v1), the same files give logits 77-94% off (scaled) and mostly other argmaxes."""
    model, golden = b2
    forgot = Model.from_pretrained(model.path, family="baichuan").logits(golden["prompt_2"])
    assert scaled_error(model.logits(golden["prompt_2"]), golden["logits_full_2"]) <= 1e-4
    assert scaled_error(forgot, golden["logits_full_2"]) > 0.5
    assert top1_agreement(forgot, golden["logits_full_2"]) < 0.5


def test_chunked_prefill_matches_original():
    model, golden = Model.from_pretrained(B2_7 / "hf", family="baichuan2"), np.load(B2_7 / "golden.npz")
    cache, prompt, start, parts = model.new_cache(), golden["prompt_2"], 0, []
    for n in (10, 10, 13):                                           # meta.json's chunks_7b
        parts.append(model.forward(prompt[start:start + n], cache))
        start += n
    assert scaled_error(np.concatenate(parts), golden["logits_chunked_2"]) <= 1e-4


def test_the_device_path_normalises_too(b2):
    """to_device reads the mapped checkpoint tensors itself (bcnp.weights.materialised): float32 on the strict
    module."""
    model, golden = b2
    device = to_device(Model.from_pretrained(model.path, family="baichuan2"), xp=strict_xp, dtype="float32")
    assert scaled_error(device.logits(golden["prompt_2"]), golden["logits_full_2"]) <= 1e-4


# --- quantized Baichuan2 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, max_error, min_top1", [(8, 0.1, 0.95), (4, 1.0, 0.6)])
def test_quantized_baichuan2_stays_close_to_float(b2, bits, max_error, min_top1):
    """Measured on the 33-token prompt: int8 max |Δ| 0.066 / 0.041, top-1 0.97 / 1.0 (13B / 7B fixture);
    int4 0.93 / 0.60, top-1 0.64 / 0.82 (unit lm_head rows make logits of the hidden state's size)."""
    model, golden = b2
    q = model.quantize(bits)
    logits, want = q.logits(golden["prompt_2"]), golden["logits_full_2"]
    assert float(np.abs(logits - want).max()) <= max_error
    assert top1_agreement(logits, want) >= min_top1
    head = q.w["lm_head.weight"]
    assert isinstance(head, QuantizedWeight) and head.bits == 8       # the normalised rows were quantized
    rows = dequantize(head.qweight, head.scales, 8)[:, : head.in_features]
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-2)


@pytest.mark.parametrize("bits", [8, 4])
def test_converting_quantized_equals_quantizing_in_memory(tmp_path, b2, bits):
    model, golden = b2
    out = convert(model.path, tmp_path / "q", quantize_bits=bits, progress=False, family="baichuan2")
    from_disk = Model.from_pretrained(out)                           # the recorded family: no flag needed
    assert from_disk.config.family == "baichuan2"
    np.testing.assert_array_equal(from_disk.logits(golden["prompt_2"]), model.quantize(bits).logits(golden["prompt_2"]))


def test_a_float_conversion_keeps_lm_head_as_stored_and_records_the_family(tmp_path, b2):
    model, golden = b2
    out = convert(model.path, tmp_path / "f", progress=False, family="baichuan2")
    assert json.loads((tmp_path / "f" / "config.json").read_text())["bcnp"]["family"] == "baichuan2"
    converted = Model.from_pretrained(out)
    np.testing.assert_array_equal(stored_tensor(out, "lm_head.weight").stored(),
                                  stored_tensor(model.path, "lm_head.weight").stored())   # lossless: normalised at load
    np.testing.assert_array_equal(converted.logits(golden["prompt_2"]), model.logits(golden["prompt_2"]))
    assert Model.from_pretrained(out, family="baichuan").config.family == "baichuan"   # the flag still wins


# --- the command lines ---------------------------------------------------------------------------------------------

def test_family_flag_of_convert_and_inspect(tmp_path):
    assert convert_main([str(B2_7 / "hf"), str(tmp_path / "out"), "--family", "baichuan2"]) == 0
    report = io.StringIO()
    assert inspect_main([str(tmp_path / "out"), "--json"], out=report) == 0
    assert json.loads(report.getvalue())["architecture"]["family"] == "baichuan2"
    report = io.StringIO()
    assert inspect_main([str(B2_7 / "hf"), "--family", "baichuan2"], out=report) == 0
    assert "Baichuan2 (NormHead" in report.getvalue()
    err = io.StringIO()
    assert inspect_main([str(B2_7 / "hf"), "--family", "llama"], err=err) != 0
    assert err.getvalue().startswith("error: ") and "--family" in err.getvalue()


def test_inspect_presets_give_the_released_baichuan2_counts():
    for preset, total in (("b2-13b", 13_896_668_160), ("b2-7b", 7_505_973_248)):
        report = io.StringIO()
        assert inspect_main(["--preset", preset, "--json"], out=report) == 0
        r = json.loads(report.getvalue())
        assert r["parameters"]["total"] == total and r["architecture"]["vocab_size"] == 125696
        assert r["memory"]["weights"]["bfloat16"] == 2 * total
        assert r["generation"]["repetition_penalty"] == 1.05


def test_every_command_that_opens_a_model_takes_family(tmp_path, monkeypatch):
    import bcnp.generate
    import bcnp.serve
    from bcnp.scoring import ArgumentParser, UsageError, add_model_arguments
    scoring = ArgumentParser()
    add_model_arguments(scoring)                                     # perplexity and eval
    parsers = [bcnp.generate.parse_args, bcnp.serve.parse_args, scoring.parse_args]
    for parse in parsers:
        assert parse(["--model", str(B2_7 / "hf"), "--family", "baichuan2"]).family == "baichuan2"
        assert parse(["--model", str(B2_7 / "hf")]).family is None
    with pytest.raises(UsageError, match="--family"):
        scoring.parse_args(["--model", "x", "--family", "baichuan3"])
    opened = []
    no_tokenizer = types.SimpleNamespace(tokenizer=None)
    monkeypatch.setattr(Model, "from_pretrained", classmethod(lambda cls, path, family=None: opened.append(family)
                                                              or no_tokenizer))
    with pytest.raises(ValueError, match="no tokenizer.model"):
        bcnp.generate.load_model(bcnp.generate.parse_args(["--model", str(B2_7 / "hf"), "--family", "baichuan2"]))
    assert opened == ["baichuan2"]


def test_a_baichuan2_7b_config_without_architectures_is_rope():
    """The released Baichuan2-7B config names both context fields; 13B's names only model_max_length."""
    from bcnp.config import Config
    d = {"model_type": "baichuan", "vocab_size": 125696, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "model_max_length": 4096, "max_position_embeddings": 4096}
    config = Config.from_dict(d)
    assert (config.family, config.position_embedding) == ("baichuan2", "rope")
