"""config.json: every field bcnp uses is type- and range-checked when the directory is opened, with one
ConfigError naming the file and the field (so inspect and convert refuse what generate would crash on)."""
import json
import math

import pytest
from hypothesis import given, settings, strategies as st

from bcnp.config import (BAICHUAN2_13B, BAICHUAN2_7B, BAICHUAN_13B, BAICHUAN_7B, MAX_CONTEXT, MAX_LAYERS, Config, ConfigError,
                         read_config_json)
from conftest import FIXTURES

GOOD_13B = {**BAICHUAN_13B.to_hf_dict(), "transformers_version": "4.29.2"}
GOOD_7B = BAICHUAN_7B.to_hf_dict()
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
         "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000,
         "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "hidden_act": "silu"}


def test_the_fixture_configs_open():
    assert Config.from_json(FIXTURES / "b13-alibi-h8-l4-bf16" / "hf").position_embedding == "alibi"
    assert Config.from_json(FIXTURES / "b7-rope-h4-l3-fp16" / "hf").position_embedding == "rope"


def test_baichuan2_is_told_by_its_vocabulary_or_an_explicit_family():
    assert Config.from_dict(GOOD_13B).family == "baichuan"
    assert Config.from_dict({**GOOD_13B, "vocab_size": 125696}).family == "baichuan2"
    assert Config.from_dict({**GOOD_13B, "vocab_size": 125696}, family="baichuan").family == "baichuan"
    tiny = FIXTURES / "b2-7-rope-h4-l3-fp16" / "hf"
    assert Config.from_json(tiny).family == "baichuan"                   # vocab 512: nothing marks it
    assert Config.from_json(tiny, family="baichuan2").family == "baichuan2"
    with pytest.raises(ConfigError, match="family must be one of baichuan, baichuan2, got 'baichuan3'"):
        Config.from_dict(GOOD_13B, family="baichuan3")


def test_both_baichuan2_sizes_are_BaichuanForCausalLM_and_7b_has_max_position_embeddings():
    # Baichuan2-7B's config.json names its context in both fields; 13B's only in model_max_length
    assert BAICHUAN2_7B.to_hf_dict()["architectures"] == ["BaichuanForCausalLM"]
    assert Config.from_dict(BAICHUAN2_7B.to_hf_dict()) == BAICHUAN2_7B
    assert Config.from_dict(BAICHUAN2_13B.to_hf_dict()) == BAICHUAN2_13B
    assert Config.from_json(FIXTURES / "b2-7-rope-h4-l3-fp16" / "hf", family="baichuan2").position_embedding == "rope"
    assert Config.from_json(FIXTURES / "b2-13-alibi-h8-l4-bf16" / "hf", family="baichuan2").position_embedding == "alibi"


def test_the_released_baichuan2_parameter_counts():
    assert BAICHUAN2_13B.num_parameters() == 13_896_668_160
    assert BAICHUAN2_7B.num_parameters() == 7_505_973_248


def test_a_recorded_family_is_read_back_and_checked():
    section = {"format_version": 2, "quantization": None, "source_dtype": "bfloat16", "float_dtype": "bfloat16"}
    assert Config.from_dict({**GOOD_13B, "bcnp": {**section, "family": "baichuan2"}}).family == "baichuan2"
    with pytest.raises(ConfigError, match="bcnp.family must be one of"):
        Config.from_dict({**GOOD_13B, "bcnp": {**section, "family": "gpt"}})


@pytest.mark.parametrize("base, field, value, message", [
    (GOOD_13B, "architectures", 5, "architectures must be a list of strings"),
    (GOOD_13B, "architectures", ["BaichuanForCausalLM", 5], "architectures must be a list of strings"),
    (GOOD_13B, "architectures", ["GPT2LMHeadModel"], "not a Baichuan config"),
    (GOOD_13B, "architectures", ["BaichuanForCausalLM", "BaiChuanForCausalLM"], "not a Baichuan config"),
    (GOOD_13B, "model_type", "gpt2", "model_type is 'gpt2', not \"baichuan\""),
    (GOOD_13B, "model_type", 5, "model_type is 5"),
    (GOOD_13B, "vocab_size", True, r"vocab_size must be an integer in \[1, 4194304\], got True"),   # bool is no int
    (GOOD_13B, "vocab_size", 0, "vocab_size must be an integer"),
    (GOOD_13B, "vocab_size", 64000.0, "vocab_size must be an integer"),
    (GOOD_13B, "hidden_size", 2**64, r"hidden_size must be an integer in \[1, 131072\]"),
    (GOOD_13B, "hidden_size", "5120", "hidden_size must be an integer"),
    (GOOD_13B, "intermediate_size", -1, "intermediate_size must be an integer"),
    (GOOD_13B, "num_hidden_layers", 10**7, r"num_hidden_layers must be an integer in \[1, 1024\]"),
    (GOOD_13B, "num_attention_heads", None, "num_attention_heads must be an integer"),
    (GOOD_13B, "num_attention_heads", 3, "hidden_size 5120 is not a multiple of num_attention_heads 3"),
    (GOOD_13B, "model_max_length", 1e12, r"model_max_length must be an integer in \[1, 1048576\], "
                                          r"got 1000000000000\.0"),
    (GOOD_13B, "model_max_length", 2**21, "model_max_length must be an integer"),
    (GOOD_13B, "model_max_length", 0, "model_max_length must be an integer"),
    (GOOD_7B, "max_position_embeddings", "4096", "max_position_embeddings must be an integer"),
    (GOOD_13B, "rms_norm_eps", "abc", r"rms_norm_eps must be a finite number in \(0, 1\), got 'abc'"),
    (GOOD_13B, "rms_norm_eps", None, "rms_norm_eps must be a finite number"),
    (GOOD_13B, "rms_norm_eps", -1, "rms_norm_eps must be a finite number"),
    (GOOD_13B, "rms_norm_eps", 0.0, "rms_norm_eps must be a finite number"),
    (GOOD_13B, "rms_norm_eps", 1.0, "rms_norm_eps must be a finite number"),
    (GOOD_13B, "rms_norm_eps", math.nan, "rms_norm_eps must be a finite number"),     # json.loads reads NaN
    (GOOD_13B, "rms_norm_eps", False, "rms_norm_eps must be a finite number"),
    (GOOD_7B, "rope_theta", 0, r"rope_theta must be a finite number in \(0, inf\)"),
    (GOOD_7B, "rope_theta", math.inf, "rope_theta must be a finite number"),
    (GOOD_13B, "eos_token_id", "two", r"eos_token_id must be an integer in \[0, 63999\], got 'two'"),
    (GOOD_13B, "eos_token_id", 64000, r"eos_token_id must be an integer in \[0, 63999\]"),
    (GOOD_13B, "bos_token_id", -1, "bos_token_id must be an integer"),
    (GOOD_13B, "pad_token_id", [0], "pad_token_id must be an integer"),
    (GOOD_13B, "torch_dtype", ["bfloat16"], "torch_dtype must be one of float32, float16, bfloat16"),
    (GOOD_13B, "torch_dtype", "int8", "torch_dtype must be one of"),
    (GOOD_13B, "tie_word_embeddings", "false", "tie_word_embeddings must be true or false"),
    (GOOD_13B, "tie_word_embeddings", True, "tie_word_embeddings=true is not a Baichuan layout"),
    (GOOD_13B, "hidden_act", "gelu", "hidden_act must be \"silu\""),
    (GOOD_13B, "hidden_act", 5, "hidden_act must be a string"),
])
def test_each_bad_field_is_a_config_error_naming_the_file_and_the_field(base, field, value, message):
    with pytest.raises(ConfigError, match=message) as e:
        Config.from_dict({**base, field: value}, source="/m/config.json")
    assert str(e.value).startswith("/m/config.json: ")


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "model_max_length"])
def test_a_missing_size_says_missing(field):
    d = dict(GOOD_13B)
    del d[field]
    with pytest.raises(ConfigError, match=f"{field} must be an integer .* got None \\(missing\\)"):
        Config.from_dict(d)


@pytest.mark.parametrize("config", [LLAMA, {**LLAMA, "model_type": "baichuan"},
                                    {k: v for k, v in LLAMA.items() if k != "architectures"},
                                    {k: v for k, v in GOOD_13B.items() if k not in ("architectures", "model_type")},
                                    {}])
def test_a_llama_or_unlabelled_config_is_not_a_baichuan_model(config):
    with pytest.raises(ConfigError, match="not a Baichuan|model_type is 'llama'"):
        Config.from_dict(config)


def test_without_architectures_the_context_field_tells_13b_from_7b():
    strip = ("architectures",)
    assert Config.from_dict({k: v for k, v in GOOD_13B.items() if k not in strip}).position_embedding == "alibi"
    assert Config.from_dict({k: v for k, v in GOOD_7B.items() if k not in strip}).position_embedding == "rope"


def test_optional_fields_take_the_baichuan_defaults():
    sizes = ("architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "model_max_length")
    c = Config.from_dict({k: GOOD_13B[k] for k in sizes})
    assert (c.rms_norm_eps, c.bos_token_id, c.eos_token_id, c.pad_token_id, c.torch_dtype) == (
        1e-6, 1, 2, 0, "float32")


FIELDS = ["architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "model_max_length", "max_position_embeddings", "rms_norm_eps", "rope_theta",
          "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "tie_word_embeddings", "hidden_act"]
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                      max_size=3), max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([GOOD_13B, GOOD_7B]), st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=3))
def test_any_field_any_json_value_opens_within_range_or_is_a_config_error(base, changes):
    try:
        c = Config.from_dict({**base, **changes})
    except ConfigError:
        return
    assert 1 <= c.num_hidden_layers <= MAX_LAYERS and 1 <= c.max_position <= MAX_CONTEXT
    assert c.hidden_size % c.num_attention_heads == 0 and 0 < c.rms_norm_eps < 1 and math.isfinite(c.rope_theta)
    assert all(0 <= t < c.vocab_size for t in (c.bos_token_id, c.eos_token_id, c.pad_token_id))
    assert all(type(v) is int for v in (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_attention_heads))


# --- the file --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (b"[" * 100_000 + b"]" * 100_000, "config.json is nested too deeply"),
    ('{"vocab_size": "é"}'.encode("latin-1"), "config.json is not UTF-8"),
    (b"{not json", "config.json is not valid JSON"),
    (b"[1, 2]", "config.json must be a JSON object, got list"),
    (b" " * (2**20 + 1), "config.json is 1,048,577 bytes, more than the 1,048,576"),
], ids=["deep", "latin-1", "not-json", "list", "large"])
def test_an_unreadable_config_json_is_a_config_error_naming_it(tmp_path, content, message):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=message) as e:
        Config.from_json(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_no_config_json_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'}: no config.json"):
        Config.from_json(tmp_path)


@pytest.mark.parametrize("section, message", [
    (5, "the bcnp section must be an object"),
    ({"format_version": "1", "quantization": None, "source_dtype": "float16"}, "bcnp.format_version"),
    ({"format_version": 1, "quantization": [8], "source_dtype": "float16"}, "bcnp.quantization must be null or"),
    ({"format_version": 1, "quantization": {"bits": 3, "block_size": 32}, "source_dtype": "bfloat16"},
     "bcnp.quantization must be null or"),
    ({"format_version": 1, "quantization": {"bits": 8, "block_size": 16}, "source_dtype": "bfloat16"},
     "bcnp.quantization must be null or"),
    ({"format_version": 1, "quantization": None, "source_dtype": ["float16"]}, "bcnp.source_dtype must be one of"),
])
def test_the_bcnp_section_written_by_convert_is_checked_too(tmp_path, section, message):
    (tmp_path / "config.json").write_text(json.dumps({**GOOD_13B, "bcnp": section}))
    with pytest.raises(ConfigError, match=message):
        read_config_json(tmp_path)
