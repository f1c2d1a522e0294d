"""bcnp.layout: the one statement of what a converted directory holds, which the writer (bcnp.convert) and the
readers (bcnp.checkpoint.read_model_dir, Model.quantize through bcnp.quant) share."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import bcnp.layout
import bcnp.quant
from bcnp.config import BAICHUAN_13B, Config, ConfigError
from bcnp.convert import bcnp_section, output_float_dtypes
from bcnp.layout import (BLOCK_SIZE, FLOAT_DTYPES, expected_converted_shapes, expected_section_shapes,
                         quantized_bits)

configs = st.builds(
    lambda vocab, heads, head_dim, layers, inter, position: Config(
        vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, max_position=64, position_embedding=position),
    st.integers(1, 300), st.integers(1, 4), st.sampled_from([2, 8, 32]), st.integers(1, 3), st.integers(1, 100),
    st.sampled_from(["alibi", "rope"]))


class FakeTensor:
    """What bcnp_section and output_float_dtypes look at: a dtype and a size."""

    def __init__(self, dtype, shape):
        self.dtype, self.numel = dtype, int(np.prod(shape))
        self.nbytes = self.numel * (4 if dtype == "float32" else 2)


@settings(max_examples=80, deadline=None)
@given(configs, st.sampled_from([None, 8, 4]), st.lists(st.sampled_from(FLOAT_DTYPES), min_size=1, max_size=3),
       st.sampled_from([None, *FLOAT_DTYPES]))
def test_what_the_writer_records_is_what_the_reader_expects(config, bits, source_dtypes, dtype):
    """Any source (mixed dtypes too), any --dtype / --quantize: config.json's section describes exactly the
    tensors the converter writes, so the reader's check of every dtype and shape holds."""
    shapes = config.weight_shapes()
    tensors = {name: FakeTensor(source_dtypes[i % len(source_dtypes)], shape)
               for i, (name, shape) in enumerate(shapes.items())}
    written = output_float_dtypes(tensors, bits, dtype)
    section = bcnp_section(config, tensors, bits, written)
    expected = expected_section_shapes(config, section)
    for name, shape in shapes.items():
        b = quantized_bits(name, bits)
        if b is None:
            assert expected[name] == (written[name], shape)
            if bits is not None and name == "model.embed_tokens.weight":
                assert written[name] == "float16"                  # as Model.quantize keeps it
            else:
                assert written[name] == (dtype or tensors[name].dtype)
        else:
            base = name[: -len(".weight")]
            (qd, (qr, qc)), (sd, (sr, sc)) = expected[base + ".qweight"], expected[base + ".scales"]
            padded = -(-shape[1] // BLOCK_SIZE) * BLOCK_SIZE
            assert (qr, sr, sd) == (shape[0], shape[0], "float16") and sc * BLOCK_SIZE == padded
            assert (qd, qc) == (("int8", padded) if b == 8 else ("uint8", padded // 2))


def test_the_block_format_facts_live_in_one_place():
    assert bcnp.quant.quantized_bits is bcnp.layout.quantized_bits and bcnp.quant.BLOCK == BLOCK_SIZE == 32
    assert bcnp.quant.padded_width is bcnp.layout.padded_width
    assert quantized_bits("lm_head.weight", 4) == 8 and quantized_bits("model.embed_tokens.weight", 4) is None
    real = expected_converted_shapes(BAICHUAN_13B, 4)                   # the real widths need no padding
    assert real["model.layers.39.self_attn.W_pack.qweight"] == ("uint8", (15360, 2560))
    assert real["model.layers.39.self_attn.W_pack.scales"] == ("float16", (15360, 160))
    assert len(real) == 2 + 40 * (2 + 5 * 2) + 2


def test_version_1_sections_mean_float16_throughout():
    section = {"format_version": 1, "quantization": {"bits": 8, "block_size": 32}, "source_dtype": "bfloat16"}
    expected = expected_section_shapes(BAICHUAN_13B, section)
    assert expected["model.norm.weight"] == ("float16", (5120,))
    with pytest.raises(ConfigError, match="must be an object"):
        expected_section_shapes(BAICHUAN_13B, ["not", "a", "section"])
    with pytest.raises(ConfigError, match="block_size must be 32"):
        expected_section_shapes(BAICHUAN_13B, {**section, "quantization": {"bits": 8, "block_size": 64}})
