"""`python -m bcnp.convert`: float16 / int8 / int4 safetensors directories that hold exactly the source's values,
written all-or-nothing."""
import json
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import bcnp.convert
import bcnp.quant
from bcnp.checkpoint import CheckpointError, read_checkpoint, read_safetensors
from bcnp.config import BAICHUAN_13B, Config, ConfigError
from bcnp.convert import convert, expected_converted_shapes
from conftest import FIXTURES, MODELS

REPO = FIXTURES.parent.parent


def original(model, layout="hf"):
    directory = FIXTURES / model / layout
    config = Config.from_json(directory)
    return config, read_checkpoint(directory, config.weight_shapes())


def float16_of(tensor):
    return tensor.float32().astype(np.float16)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bcnp.convert", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)


def leftovers(parent, name):
    """Temporary directories a conversion to parent/name may have left behind."""
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# --- float16 -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_float16_conversion_holds_the_source_values(tmp_path, model):
    config, source = original(model)
    out = convert(FIXTURES / model / "hf", tmp_path / "out", progress=False)
    converted = read_checkpoint(out, expected_converted_shapes(config, None))
    assert set(converted) == set(config.weight_shapes())
    for name, tensor in source.items():
        assert converted[name].dtype == "float16"
        assert np.array_equal(converted[name].numpy(), float16_of(tensor))   # exactly float16(original)
    # The safetensors package reads our writer's files the same way.
    import safetensors.numpy
    theirs = safetensors.numpy.load_file(tmp_path / "out" / "model.safetensors")
    assert set(theirs) == set(converted)
    assert all(np.array_equal(theirs[n], converted[n].numpy()) for n in theirs)


@pytest.mark.parametrize("model", MODELS)
def test_bin_and_safetensors_sources_convert_to_identical_files(tmp_path, model):
    convert(FIXTURES / model / "hf", tmp_path / "from-bin", progress=False)
    convert(FIXTURES / model / "hf-safetensors", tmp_path / "from-st", progress=False)
    for name in ["model.safetensors", "config.json", "generation_config.json"]:
        assert (tmp_path / "from-bin" / name).read_bytes() == (tmp_path / "from-st" / name).read_bytes()


def test_config_gets_a_bcnp_section_and_side_files_are_copied(tmp_path):
    source = shutil.copytree(FIXTURES / "b13-alibi-h8-l4-bf16" / "hf", tmp_path / "hf")
    shutil.copy(FIXTURES / "tokenizers" / "tiny-spm.model", source / "tokenizer.model")
    (source / "tokenizer_config.json").write_text('{"add_bos_token": false}')
    out = tmp_path / "out"
    convert(source, out, progress=False)
    before = json.loads((source / "config.json").read_text())
    after = json.loads((out / "config.json").read_text())
    assert after.pop("bcnp") == {"format_version": 1, "quantization": None, "source_dtype": "bfloat16"}
    assert after == before
    for name in ["generation_config.json", "tokenizer.model", "tokenizer_config.json"]:
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert Config.from_json(out) == Config.from_json(source)


def test_without_a_tokenizer_none_is_written(tmp_path):
    convert(FIXTURES / "b7-rope-h4-l3-fp16" / "hf", tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "generation_config.json", "model.safetensors"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["bcnp"]["source_dtype"] == "float16"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask      # not the private temp dir's 0700


def test_large_outputs_are_sharded_with_a_correct_index(tmp_path):
    config, source = original("b13-alibi-h8-l4-bf16")
    max_bytes = 150_000
    out = tmp_path / "out"
    convert(FIXTURES / "b13-alibi-h8-l4-bf16" / "hf", out, max_shard_bytes=max_bytes, progress=False)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n > 2 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(source) and set(index["weight_map"].values()) == set(files)
    sizes = {}
    for file in files:
        tensors = read_safetensors(out / file)
        assert {n for n, f in index["weight_map"].items() if f == file} == set(tensors)
        sizes[file] = sum(t.nbytes for t in tensors.values())
        largest = max(t.nbytes for t in tensors.values())
        assert sizes[file] <= max_bytes or len(tensors) == 1 and largest > max_bytes
    assert index["metadata"]["total_size"] == sum(sizes.values()) == sum(t.numel * 2 for t in source.values())
    converted = read_checkpoint(out, expected_converted_shapes(config, None))
    assert all(np.array_equal(converted[n].numpy(), float16_of(t)) for n, t in source.items())


@pytest.mark.parametrize("bits", [None, 4])
def test_conversion_streams_instead_of_holding_the_model(tmp_path, monkeypatch, bits):
    """Peak Python/NumPy allocation stays near one chunk of rows, far below the model's size."""
    monkeypatch.setattr(bcnp.convert, "CHUNK_ROWS", 16)
    _, source = original("b13-alibi-h8-l4-bf16")
    model_float16_bytes = sum(t.numel * 2 for t in source.values())
    tracemalloc.start()
    try:
        convert(FIXTURES / "b13-alibi-h8-l4-bf16" / "hf", tmp_path / "out", quantize_bits=bits, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < model_float16_bytes / 4, (peak, model_float16_bytes)


# --- all or nothing ------------------------------------------------------------------------------------------

def set_bfloat16(path, name, bits):
    """Overwrite the first value of tensor `name` in a safetensors file with raw bfloat16 bits."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    begin = json.loads(data[8:8 + n])[name]["data_offsets"][0]
    data[8 + n + begin: 8 + n + begin + 2] = struct.pack("<H", bits)
    path.write_bytes(bytes(data))


def test_a_failing_conversion_leaves_no_directory(tmp_path):
    source = shutil.copytree(FIXTURES / "b13-alibi-h8-l4-bf16" / "hf-safetensors", tmp_path / "hf")
    set_bfloat16(source / "model-00003-of-00003.safetensors", "lm_head.weight", 0x4780)   # 65536: no float16
    with pytest.raises(CheckpointError, match=r"model-00003-of-00003\.safetensors: tensor lm_head\.weight .*65536"):
        convert(source, tmp_path / "out", max_shard_bytes=200_000, progress=False)   # fails on the last shard
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_non_finite_weights_fail_quantization_naming_the_tensor(tmp_path):
    source = shutil.copytree(FIXTURES / "b13-alibi-h8-l4-bf16" / "hf-safetensors", tmp_path / "hf")
    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.2.mlp.up_proj.weight"
    set_bfloat16(source / index[name], name, 0x7FC0)                                         # NaN
    with pytest.raises(ValueError, match=rf"tensor {name} holds a non-finite value at index"):
        convert(source, tmp_path / "out", quantize_bits=8, progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_an_interrupted_conversion_leaves_no_directory(tmp_path, monkeypatch):
    write_shard, calls = bcnp.convert.write_shard, []

    def interrupted_after_two_shards(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[0])
        write_shard(*args)

    monkeypatch.setattr(bcnp.convert, "write_shard", interrupted_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        convert(FIXTURES / "b7-rope-h4-l3-fp16" / "hf", tmp_path / "out", max_shard_bytes=50_000, progress=False)
    assert len(calls) == 2 and not os.path.exists(calls[0])
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_corrupt_input_is_refused_before_anything_is_written(tmp_path):
    source = shutil.copytree(FIXTURES / "b7-rope-h4-l3-fp16" / "hf", tmp_path / "hf")
    shard = source / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        convert(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_an_existing_output_is_replaced_only_with_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        convert(FIXTURES / "b7-rope-h4-l3-fp16" / "hf", out, progress=False)
    assert os.listdir(out) == ["precious.txt"]
    convert(FIXTURES / "b7-rope-h4-l3-fp16" / "hf", out, force=True, progress=False)
    assert "precious.txt" not in os.listdir(out) and (out / "model.safetensors").exists()
    assert leftovers(tmp_path, "out") == []
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(FIXTURES / "b7-rope-h4-l3-fp16" / "hf", empty, progress=False)   # an empty directory is fine
    with pytest.raises(FileExistsError, match="input directory"):
        convert(out, out, force=True, progress=False)


def test_a_converted_directory_is_not_converted_again(tmp_path):
    convert(FIXTURES / "b7-rope-h4-l3-fp16" / "hf", tmp_path / "once", progress=False)
    with pytest.raises(ConfigError, match="already converted"):
        convert(tmp_path / "once", tmp_path / "twice", progress=False)


# --- command line --------------------------------------------------------------------------------------------

def test_cli_converts(tmp_path):
    result = run_cli(FIXTURES / "b13-alibi-h8-l4-bf16" / "hf-safetensors", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    config = Config.from_json(tmp_path / "out")
    assert len(read_checkpoint(tmp_path / "out", expected_converted_shapes(config, None))) == 35 - 4


@pytest.mark.parametrize("args,message", [
    (["{fixtures}/nowhere", "{tmp}/out"], "nowhere"),
    (["{tmp}/missing-shard", "{tmp}/out"], "pytorch_model-00001-of-00002.bin: missing shard"),
    (["{fixtures}/b7-rope-h4-l3-fp16/hf", "{tmp}/out", "--quantize", "3"], "--quantize"),
    (["{fixtures}/b7-rope-h4-l3-fp16/hf", "{tmp}/full"], "--force"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    missing = shutil.copytree(FIXTURES / "b7-rope-h4-l3-fp16" / "hf", tmp_path / "missing-shard")
    (missing / "pytorch_model-00001-of-00002.bin").unlink()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    result = run_cli(*[a.format(fixtures=FIXTURES, tmp=tmp_path) for a in args])
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_importing_the_converter_does_not_import_torch():
    code = "import sys, bcnp.convert; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --- quantized ----------------------------------------------------------------------------------------------

def test_expected_converted_shapes_pad_rows_to_whole_blocks():
    config = Config.from_json(FIXTURES / "b7-rope-h4-l3-fp16" / "hf")          # intermediate_size 172
    int8 = expected_converted_shapes(config, 8)
    assert int8["model.layers.0.mlp.down_proj.qweight"] == ("int8", (64, 192))
    assert int8["model.layers.0.mlp.down_proj.scales"] == ("float16", (64, 6))
    int4 = expected_converted_shapes(config, 4)
    assert int4["model.layers.0.mlp.down_proj.qweight"] == ("uint8", (64, 96))
    assert int4["lm_head.qweight"] == ("int8", (512, 64))                       # lm_head stays 8 bits
    assert int4["model.embed_tokens.weight"] == ("float16", (512, 64))
    assert int4["model.norm.weight"] == ("float16", (64,))
    # The real 13B: no padding, 4 bits + one float16 scale per 32 weights = 4.5 bits per linear weight.
    real = expected_converted_shapes(BAICHUAN_13B, 4)
    assert real["model.layers.39.self_attn.W_pack.qweight"] == ("uint8", (15360, 2560))
    assert real["model.layers.39.self_attn.W_pack.scales"] == ("float16", (15360, 160))
    assert len(real) == 2 + 40 * (2 + 5 * 2) + 2


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("model", MODELS)
def test_quantized_conversion_matches_quantize(tmp_path, monkeypatch, model, bits):
    from bcnp.quant import quantize

    monkeypatch.setattr(bcnp.convert, "CHUNK_ROWS", 100)                        # rows arrive in pieces
    config, source = original(model)
    out = convert(FIXTURES / model / "hf", tmp_path / "out", quantize_bits=bits, progress=False)
    expected = expected_converted_shapes(config, bits)
    converted = read_checkpoint(out, expected)
    assert set(converted) == set(expected)
    for name, tensor in source.items():
        if bcnp.quant.is_linear(name):
            base = name[: -len(".weight")]
            q, s = quantize(tensor.float32(), 8 if name == "lm_head.weight" else bits)
            assert np.array_equal(converted[base + ".qweight"].numpy(), q), name
            assert np.array_equal(converted[base + ".scales"].numpy(), s), name
        else:
            assert np.array_equal(converted[name].numpy(), float16_of(tensor)), name
    section = json.loads((tmp_path / "out" / "config.json").read_text())["bcnp"]
    assert section["quantization"] == {"bits": bits, "block_size": 32}


def test_cli_quantizes(tmp_path):
    result = run_cli(FIXTURES / "b7-rope-h4-l3-fp16" / "hf", tmp_path / "q4", "--quantize", "4")
    assert result.returncode == 0, result.stderr
    config = Config.from_json(tmp_path / "q4")
    tensors = read_checkpoint(tmp_path / "q4", expected_converted_shapes(config, 4))
    assert tensors["model.layers.2.mlp.up_proj.qweight"].dtype == "uint8"
    assert tensors["lm_head.qweight"].dtype == "int8"
