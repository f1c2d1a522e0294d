"""`python -m bcnp.convert`: directories that hold exactly the source's float tensors (or its int8/int4 blocks),
every non-weight file of the source, and open with the same logits. Data-loss cases: test_convert_safety.py."""
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import safetensors.numpy

import bcnp.convert
import bcnp.quant
from bcnp import Model
from bcnp.checkpoint import CheckpointError, read_checkpoint, read_model_dir, read_safetensors
from bcnp.config import Config, ConfigError
from bcnp.convert import convert, expected_converted_shapes
from conftest import FIXTURES, MODELS

REPO = FIXTURES.parent.parent
LAYOUTS = ["hf", "hf-safetensors"]


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
    """Work directories a conversion to parent/name may have left behind."""
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def float32_source(tmp_path, model="b13-alibi-h8-l4-bf16", norms_dtype=np.float32):
    """A float32 fine-tune of a fixture: values float16 cannot hold (the original's, nudged by one part in 1e4),
    as one safetensors file; `norms_dtype` float16 makes it a mixed-precision checkpoint."""
    config, source = original(model)
    rng = np.random.default_rng(0)
    arrays = {}
    for name, tensor in source.items():
        x = tensor.float32()
        x = (x * (1 + 1e-4 * rng.standard_normal(x.shape))).astype(np.float32)
        arrays[name] = x.astype(norms_dtype) if name.endswith("layernorm.weight") else x
    directory = tmp_path / f"{model}-fp32"
    directory.mkdir()
    safetensors.numpy.save_file(arrays, directory / "model.safetensors", metadata={"format": "pt"})
    d = json.loads((FIXTURES / model / "hf" / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**d, "torch_dtype": "float32"}))
    shutil.copy(FIXTURES / model / "hf" / "generation_config.json", directory)
    return directory


def sources(tmp_path):
    """Every fixture model in both layouts, and a float32 one: bfloat16, float16 and float32 checkpoints."""
    return [FIXTURES / m / layout for m in MODELS for layout in LAYOUTS] + [float32_source(tmp_path)]


def bfloat16_bits(x):
    """float32 -> bfloat16 bits, round to nearest even (NumPy, independent of bcnp._dtypes)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


# --- lossless -----------------------------------------------------------------------------------------------

def test_every_float_tensor_keeps_its_dtype_bit_for_bit(tmp_path):
    for k, source in enumerate(sources(tmp_path)):
        config = Config.from_json(source)
        before = read_checkpoint(source, config.weight_shapes())
        out = pathlib.Path(convert(source, tmp_path / f"out{k}", progress=False))
        _, section, after = read_model_dir(out)
        assert list(after) == list(config.weight_shapes()), source
        for name, tensor in before.items():
            assert after[name].dtype == tensor.dtype, (source, name)
            assert after[name].numpy().tobytes() == tensor.numpy().tobytes(), (source, name)
        assert section["float_dtype"] == section["source_dtype"] == before["lm_head.weight"].dtype


def test_a_converted_directory_gives_the_logits_of_its_source(tmp_path):
    """The same tensors, so the same numbers: exactly, not only within the 1e-4 of the golden logits."""
    for k, source in enumerate(sources(tmp_path)):
        golden_path = source.parent / "golden.npz"                 # the float32 source has none
        golden = np.load(golden_path if golden_path.exists() else FIXTURES / MODELS[0] / "golden.npz")
        out = pathlib.Path(convert(source, tmp_path / f"out{k}", progress=False))
        prompt = golden["prompt_2"]
        want, got = Model.from_pretrained(source).logits(prompt), Model.from_pretrained(out).logits(prompt)
        np.testing.assert_array_equal(got, want, err_msg=str(source))
        if golden_path.exists():
            scale = max(1.0, float(np.abs(golden["logits_full_2"]).max()))
            assert np.abs(got - golden["logits_full_2"]).max() / scale <= 1e-4


def test_float32_is_no_longer_rounded_to_float16(tmp_path):
    """The defect this format version fixes: float16 storage moved a float32 model's logits by ~1e-3."""
    source = float32_source(tmp_path)
    prompt = np.load(FIXTURES / "b13-alibi-h8-l4-bf16" / "golden.npz")["prompt_2"]
    want = Model.from_pretrained(source).logits(prompt)
    kept = Model.from_pretrained(convert(source, tmp_path / "kept", progress=False)).logits(prompt)
    rounded = Model.from_pretrained(convert(source, tmp_path / "f16", dtype="float16", progress=False)).logits(prompt)
    assert np.abs(kept - want).max() == 0 < np.abs(rounded - want).max()


def test_mixed_precision_sources_keep_each_tensor_dtype(tmp_path):
    source = float32_source(tmp_path, norms_dtype=np.float16)
    out = pathlib.Path(convert(source, tmp_path / "out", progress=False))
    section = json.loads((out / "config.json").read_text())["bcnp"]
    assert section["float_dtype"] == "float32"
    assert set(section["float_dtypes"]) == {n for n in Config.from_json(source).weight_shapes()
                                            if n.endswith("layernorm.weight")}
    assert set(section["float_dtypes"].values()) == {"float16"}
    _, _, after = read_model_dir(out)
    assert after["model.layers.0.input_layernorm.weight"].dtype == "float16"
    assert after["lm_head.weight"].dtype == "float32"


@pytest.mark.parametrize("model", MODELS)
def test_dtype_converts_on_purpose(tmp_path, model):
    config, source = original(model)
    for dtype in ("float16", "bfloat16", "float32"):
        out = pathlib.Path(convert(FIXTURES / model / "hf", tmp_path / dtype, dtype=dtype, progress=False))
        _, section, after = read_model_dir(out)
        assert section["float_dtype"] == dtype and section["source_dtype"] == config.torch_dtype
        for name, tensor in source.items():
            want = {"float16": float16_of(tensor), "float32": tensor.float32(),
                    "bfloat16": bfloat16_bits(tensor.float32())}[dtype]
            assert after[name].dtype == dtype and np.array_equal(after[name].numpy(), want), (dtype, name)


def test_dtype_refuses_values_the_target_cannot_hold(tmp_path):
    source = float32_source(tmp_path)
    tensors = safetensors.numpy.load_file(source / "model.safetensors")
    tensors["model.norm.weight"][3] = 3.4e38                        # finite in float32, infinity in bfloat16
    safetensors.numpy.save_file(tensors, source / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight holds 3\.4e\+38, beyond bfloat16"):
        convert(source, tmp_path / "out", dtype="bfloat16", progress=False)
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight holds 3\.4e\+38, beyond float16"):
        convert(source, tmp_path / "out", dtype="float16", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def set_raw(path, name, raw):
    """Overwrite the first value of tensor `name` in a safetensors file with raw bytes."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    begin = json.loads(data[8:8 + n])[name]["data_offsets"][0]
    data[8 + n + begin: 8 + n + begin + len(raw)] = raw
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("bits", [None, 8])
@pytest.mark.parametrize("model, raw", [("b13-alibi-h8-l4-bf16", struct.pack("<H", 0x7FC0)),   # bfloat16 NaN
                                        ("b7-rope-h4-l3-fp16", struct.pack("<H", 0x7C00))])   # float16 +inf
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, model, raw, bits):
    """Raw byte copies too: a same-dtype copy goes through the same check as a conversion."""
    source = shutil.copytree(FIXTURES / model / "hf-safetensors", tmp_path / "hf")
    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.1.input_layernorm.weight"):
        set_raw(source / index[name], name, raw)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.\S+ holds a non-finite value at index"):
        convert(source, tmp_path / "out", quantize_bits=bits, progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


# --- the directory ------------------------------------------------------------------------------------------

def test_config_gets_a_bcnp_section_and_every_other_file_is_copied(tmp_path):
    source = shutil.copytree(FIXTURES / "b13-alibi-h8-l4-bf16" / "hf", tmp_path / "hf")
    shutil.copy(FIXTURES / "tokenizers" / "tiny-spm.model", source / "tokenizer.model")
    side = {"tokenizer_config.json": '{"add_bos_token": false}', "special_tokens_map.json": "{}",
            "modeling_baichuan.py": "# remote code\n", "configuration_baichuan.py": "#\n", "README.md": "hi"}
    for name, text in side.items():
        (source / name).write_text(text)
    (source / "training_args.bin").write_bytes(b"not ours to copy")     # weights-like files are not copied
    (source / "subdir").mkdir()                                          # nor directories
    out = tmp_path / "out"
    convert(source, out, progress=False)
    before = json.loads((source / "config.json").read_text())
    after = json.loads((out / "config.json").read_text())
    assert after.pop("bcnp") == {"format_version": 2, "family": "baichuan", "quantization": None,
                                 "source_dtype": "bfloat16", "float_dtype": "bfloat16"}
    assert after == before
    copied = ["generation_config.json", "tokenizer.model", *side]
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors", *copied])
    for name in copied:
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert Config.from_json(out) == Config.from_json(source)


def test_the_output_is_a_safetensors_checkpoint_transformers_accepts(tmp_path):
    """transformers loads a safetensors file only if its metadata says "format": "pt"."""
    out = pathlib.Path(convert(FIXTURES / "b7-rope-h4-l3-fp16" / "hf", tmp_path / "out", progress=False))
    from safetensors import safe_open
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        assert f.metadata()["format"] == "pt"
    theirs = safetensors.numpy.load_file(out / "model.safetensors")
    ours = read_checkpoint(out)
    assert set(theirs) == set(ours) and all(np.array_equal(theirs[n], ours[n].numpy()) for n in theirs)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask      # not a private temporary directory's 0700


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
    assert index["metadata"]["total_size"] == sum(sizes.values()) == sum(t.nbytes for t in source.values())
    _, _, converted = read_model_dir(out)
    assert all(np.array_equal(converted[n].numpy(), t.numpy()) for n, t in source.items())


@pytest.mark.parametrize("bits", [None, 4])
def test_conversion_streams_instead_of_holding_the_model(tmp_path, monkeypatch, bits):
    """Peak Python/NumPy allocation stays near one chunk of rows, far below the model's size."""
    monkeypatch.setattr(bcnp.convert, "CHUNK_ROWS", 16)
    _, source = original("b13-alibi-h8-l4-bf16")
    model_bytes = sum(t.nbytes for t in source.values())
    tracemalloc.start()
    try:
        convert(FIXTURES / "b13-alibi-h8-l4-bf16" / "hf", tmp_path / "out", quantize_bits=bits, dtype="float32",
                progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < model_bytes / 4, (peak, model_bytes)


def test_directories_of_format_version_1_still_open(tmp_path):
    """Version 1 stored every float tensor as float16 and recorded no float_dtype."""
    out = tmp_path / "v1"
    convert(FIXTURES / "b13-alibi-h8-l4-bf16" / "hf", out, dtype="float16", progress=False)
    prompt = np.load(FIXTURES / "b13-alibi-h8-l4-bf16" / "golden.npz")["prompt_1"]
    want = Model.from_pretrained(out).logits(prompt)
    config = json.loads((out / "config.json").read_text())
    config["bcnp"] = {"format_version": 1, "quantization": None, "source_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(config))
    np.testing.assert_array_equal(Model.from_pretrained(out).logits(prompt), want)


@pytest.mark.parametrize("change, message", [
    ({"format_version": 3}, r"bcnp\.format_version 3 is not one this bcnp reads"),
    ({"float_dtype": "float32"}, r"tensor model\.embed_tokens\.weight has dtype bfloat16, expected float32"),
    ({"float_dtype": "int8"}, r"bcnp\.float_dtype must be one of float16, bfloat16, float32"),
    ({"float_dtypes": {"lm_head.weight": "float64"}}, r"bcnp\.float_dtypes has 'lm_head\.weight': 'float64'"),
    ({"quantization": {"bits": 3}}, r"bcnp\.quantization(\.bits)? must be"),
])
def test_a_bcnp_section_that_does_not_describe_the_files_is_refused(tmp_path, change, message):
    out = pathlib.Path(convert(FIXTURES / "b13-alibi-h8-l4-bf16" / "hf", tmp_path / "out", progress=False))
    config = json.loads((out / "config.json").read_text())
    config["bcnp"].update(change)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises((ConfigError, CheckpointError), match=message) as e:
        read_model_dir(out)
    assert "out" in str(e.value)                                          # names the directory's file


def test_a_converted_directory_is_not_converted_again(tmp_path):
    convert(FIXTURES / "b7-rope-h4-l3-fp16" / "hf", tmp_path / "once", progress=False)
    with pytest.raises(ConfigError, match="already converted"):
        convert(tmp_path / "once", tmp_path / "twice", progress=False)


# --- quantized ----------------------------------------------------------------------------------------------

def test_expected_converted_shapes_pad_rows_to_whole_blocks():
    config = Config.from_json(FIXTURES / "b7-rope-h4-l3-fp16" / "hf")          # intermediate_size 172
    int8 = expected_converted_shapes(config, 8, "bfloat16")
    assert int8["model.layers.0.mlp.down_proj.qweight"] == ("int8", (64, 192))
    assert int8["model.layers.0.mlp.down_proj.scales"] == ("float16", (64, 6))
    assert int8["model.norm.weight"] == ("bfloat16", (64,))                   # norms keep the float dtype
    int4 = expected_converted_shapes(config, 4)
    assert int4["model.layers.0.mlp.down_proj.qweight"] == ("uint8", (64, 96))
    assert int4["lm_head.qweight"] == ("int8", (512, 64))                       # lm_head stays 8 bits
    assert int4["model.embed_tokens.weight"] == ("float16", (512, 64))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("model", MODELS)
def test_quantized_conversion_matches_quantize(tmp_path, monkeypatch, model, bits):
    from bcnp.quant import quantize

    monkeypatch.setattr(bcnp.convert, "CHUNK_ROWS", 100)                        # rows arrive in pieces
    config, source = original(model)
    out = pathlib.Path(convert(FIXTURES / model / "hf", tmp_path / "out", quantize_bits=bits, progress=False))
    _, section, converted = read_model_dir(out)
    assert set(converted) == set(expected_converted_shapes(config, bits))
    for name, tensor in source.items():
        if bcnp.quant.is_linear(name):
            base = name[: -len(".weight")]
            q, s = quantize(tensor.float32(), 8 if name == "lm_head.weight" else bits)
            assert np.array_equal(converted[base + ".qweight"].numpy(), q), name
            assert np.array_equal(converted[base + ".scales"].numpy(), s), name
        elif name == "model.embed_tokens.weight":
            assert np.array_equal(converted[name].numpy(), float16_of(tensor)), name   # as Model.quantize
        else:
            assert converted[name].numpy().tobytes() == tensor.numpy().tobytes(), name  # norms: untouched
    assert section["quantization"] == {"bits": bits, "block_size": 32}
    assert section["float_dtype"] == config.torch_dtype and "float_dtypes" not in section


# --- command line -------------------------------------------------------------------------------------------

def test_cli_converts(tmp_path):
    result = run_cli(FIXTURES / "b13-alibi-h8-l4-bf16" / "hf-safetensors", tmp_path / "out", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    _, section, tensors = read_model_dir(tmp_path / "out")
    assert len(tensors) == 35 - 4 and {t.dtype for t in tensors.values()} == {"float32"}
    assert section["float_dtype"] == "float32"


def test_cli_quantizes(tmp_path):
    result = run_cli(FIXTURES / "b7-rope-h4-l3-fp16" / "hf", tmp_path / "q4", "--quantize", "4")
    assert result.returncode == 0, result.stderr
    _, _, tensors = read_model_dir(tmp_path / "q4")
    assert tensors["model.layers.2.mlp.up_proj.qweight"].dtype == "uint8"
    assert tensors["lm_head.qweight"].dtype == "int8"


@pytest.mark.parametrize("args,message", [
    (["{fixtures}/nowhere", "{tmp}/out"], "nowhere"),
    (["{tmp}/missing-shard", "{tmp}/out"], "pytorch_model-00001-of-00002.bin: missing shard"),
    (["{fixtures}/b7-rope-h4-l3-fp16/hf", "{tmp}/out", "--quantize", "3"], "--quantize"),
    (["{fixtures}/b7-rope-h4-l3-fp16/hf", "{tmp}/out", "--dtype", "float64"], "--dtype"),
    (["{fixtures}/b7-rope-h4-l3-fp16/hf", "{tmp}/full"], "--force"),
    *[(["{fixtures}/b7-rope-h4-l3-fp16/hf", "{tmp}/out", "--max-shard-gb", gb], "--max-shard-gb")
      for gb in ("inf", "nan", "0", "-1", "1e-12", "lots")],
    (["{tmp}/evil\x1b[2J\nname", "{tmp}/out"], "evil\\x1b[2J\\nname"),     # escaped, still one line
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
    assert "\x1b" not in result.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_importing_the_converter_does_not_import_torch():
    code = "import sys, bcnp.convert; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_a_generation_config_that_generate_would_refuse_is_refused_before_anything_is_written(tmp_path):
    source = tmp_path / "hf"
    shutil.copytree(FIXTURES / "b13-alibi-h8-l4-bf16" / "hf", source)
    (source / "generation_config.json").write_text('{"temperature": "hot"}')
    with pytest.raises(ValueError, match=r"generation_config.json: temperature must be"):
        convert(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
