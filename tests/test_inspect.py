"""`python -m bcnp.inspect`: the report on a model's architecture, tensors, parameters, positions, memory and
generation defaults, for the released shapes (presets), Hugging Face fixtures and converted directories."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bcnp.checkpoint import read_checkpoint
from bcnp.config import BAICHUAN_7B, BAICHUAN_13B, Config
from bcnp.convert import convert, expected_converted_shapes
from bcnp.inspect import (PARAMETER_KINDS, group_tensors, inspect_model, kv_cache_bytes, parameter_counts,
                          weight_bytes)
from bcnp.cache import new_cache
from conftest import FIXTURES

REPO = FIXTURES.parent.parent
B13, B7 = FIXTURES / "b13-alibi-h8-l4-bf16", FIXTURES / "b7-rope-h4-l3-fp16"
FIXTURE_DIRS = [B13 / "hf", B13 / "hf-safetensors", B7 / "hf"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bcnp.inspect", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)


def numel(shape):
    return int(np.prod(shape, dtype=np.int64))


# --- the released shapes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, total, name", [(BAICHUAN_13B, 13_264_901_120, "Baichuan-13B"),
                                                 (BAICHUAN_7B, 7_000_559_616, "Baichuan-7B")])
def test_presets_count_exactly_the_released_parameters(config, total, name):
    r = inspect_model(config)
    p = r["parameters"]
    assert p["total"] == total == config.num_parameters()
    assert sum(p[k] for k in PARAMETER_KINDS) == total
    assert r["architecture"]["matches"] == name
    assert r["stored_bytes"] == 2 * total == r["memory"]["weights"]["bfloat16"]    # both released in 2-byte dtypes
    assert r["memory"]["weights"]["float32"] == 4 * total
    assert r["num_tensors"] == len(r["tensors"]) == 3 + 7 * config.num_hidden_layers


def test_13b_preset_parts():
    r = inspect_model(BAICHUAN_13B)
    assert r["parameters"] == {"embedding": 327_680_000, "attention.W_pack": 3_145_728_000,
                               "attention.o_proj": 1_048_576_000, "mlp": 8_414_822_400, "norms": 414_720,
                               "lm_head": 327_680_000, "total": 13_264_901_120}
    a = r["architecture"]
    assert (a["arch"], a["positions"], a["hidden_size"], a["intermediate_size"], a["num_attention_heads"],
            a["head_dim"], a["num_hidden_layers"], a["vocab_size"], a["context"]) == \
        ("BaichuanForCausalLM", "alibi", 5120, 13696, 40, 128, 40, 64000, 4096)
    assert r["stored_bytes"] == 26_529_802_240                                # SPEC §1: the three released shards
    shapes = {t["name"]: tuple(t["shape"]) for t in r["tensors"]}
    assert shapes["model.layers.39.self_attn.W_pack.weight"] == (15360, 5120)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (5120, 13696)
    # A full float32 KV cache: k and v, 40 layers, 4096 positions, 5120 values, 4 bytes.
    assert r["memory"]["kv_cache"]["float32"] == 2 * 40 * 4096 * 5120 * 4 == 6_710_886_400
    assert r["memory"]["kv_cache"]["float16"] == 3_355_443_200


def test_13b_alibi_slopes_follow_the_40_head_rule():
    slopes = inspect_model(BAICHUAN_13B)["position_encoding"]["alibi_slopes"]
    assert len(slopes) == 40
    assert np.allclose(slopes[:32], [2 ** (-0.25 * (h + 1)) for h in range(32)], rtol=1e-12)
    assert np.allclose(slopes[32:], [2 ** (-0.125 * (h + 1)) for h in range(0, 16, 2)], rtol=1e-12)


def test_7b_rope_frequencies():
    pos = inspect_model(BAICHUAN_7B)["position_encoding"]
    assert pos["kind"] == "rope" and "alibi_slopes" not in pos
    assert np.allclose(pos["rope_inv_freq"], 10000.0 ** (-np.arange(0, 128, 2) / 128), rtol=1e-6)


def test_quantized_sizes_of_the_13b():
    w = inspect_model(BAICHUAN_13B)["memory"]["weights"]
    linear_per_layer = 3 * 5120 * 5120 + 5120 * 5120 + 3 * 13696 * 5120
    norms = (2 * 40 + 1) * 5120
    head, embedding = 64000 * 5120, 64000 * 5120
    # int8: 34 bytes per 32 values everywhere it quantizes; int4: 18 bytes per 32, lm_head still int8;
    # the embedding and the norms float16.
    assert w["int8"] == (40 * linear_per_layer + head) // 32 * 34 + 2 * (embedding + norms) == 14_401_546_240
    assert w["int4"] == 40 * linear_per_layer // 32 * 18 + head // 32 * 34 + 2 * (embedding + norms) \
        == 8_096_983_040


configs = st.builds(
    lambda heads, head_dim, layers, inter, vocab, position: Config(
        vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, max_position=64, position_embedding=position),
    st.integers(1, 12), st.sampled_from([2, 4, 8, 16, 32]), st.integers(1, 5), st.integers(1, 200),
    st.integers(3, 300), st.sampled_from(["alibi", "rope"]))


@settings(max_examples=60, deadline=None)
@given(configs)
def test_counts_and_bytes_agree_with_the_shapes_and_the_converter(config):
    V, H, I, L = config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers
    counts = parameter_counts(config)
    assert counts["total"] == config.num_parameters() == 2 * V * H + L * (4 * H * H + 3 * I * H + 2 * H) + H
    assert counts["mlp"] == 3 * L * I * H and counts["attention.W_pack"] == 3 * L * H * H
    # What the report promises for int8/int4/float16 is exactly what bcnp.convert writes.
    for precision, bits in (("float16", None), ("int8", 8), ("int4", 4)):
        written = sum(numel(shape) * np.dtype(dtype).itemsize
                      for dtype, shape in expected_converted_shapes(config, bits).values())
        assert weight_bytes(config, precision) == written
    assert kv_cache_bytes(config, 4) == 2 * L * H * 64 * 4


# --- directories -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("directory", FIXTURE_DIRS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fixture_directories_list_every_tensor(directory):
    config = Config.from_json(directory)
    stored = read_checkpoint(directory, config.weight_shapes())
    r = inspect_model(directory)
    assert r["format"] == "huggingface" and r["quantization"] is None
    assert [t["name"] for t in r["tensors"]] == list(config.weight_shapes())            # all of them, model order
    for t in r["tensors"]:
        assert tuple(t["shape"]) == config.weight_shapes()[t["name"]] == stored[t["name"]].shape
        assert t["dtype"] == stored[t["name"]].dtype == config.torch_dtype
        assert t["nbytes"] == numel(t["shape"]) * 2
        assert t["file"] == stored[t["name"]].path.rsplit("/", 1)[-1]
    assert r["stored_bytes"] == sum(t.nbytes for t in stored.values()) == 2 * config.num_parameters()
    assert {f["file"] for f in r["files"]} == {t["file"] for t in r["tensors"]}
    assert sum(count for _, count, *_ in group_tensors(r["tensors"])) == r["num_tensors"]


@pytest.mark.parametrize("fixture, key", [(B13, "alibi_slopes"), (B7, "rope_inv_freq")])
def test_positions_match_the_original(fixture, key):
    golden = np.load(fixture / "golden.npz")[key]
    got = inspect_model(fixture / "hf")["position_encoding"][key]
    assert np.array_equal(np.float32(got), golden)


@pytest.mark.parametrize("fixture", [B13, B7], ids=lambda p: p.name)
def test_kv_cache_bytes_are_what_new_cache_allocates(fixture):
    config = Config.from_json(fixture / "hf")
    kv = inspect_model(fixture / "hf")["memory"]["kv_cache"]
    cache = new_cache(np, config)
    assert kv["tokens"] == config.max_position
    assert kv["float32"] == cache.k.nbytes + cache.v.nbytes == kv["float32_per_token"] * config.max_position
    half = new_cache(np, config, dtype=np.float16)
    assert kv["float16"] == half.k.nbytes + half.v.nbytes


@pytest.mark.parametrize("bits, precision", [(None, "float16"), (8, "int8"), (4, "int4")])
def test_converted_directory_holds_the_bytes_the_report_predicts(tmp_path, bits, precision):
    out = convert(B13 / "hf", tmp_path / "converted", quantize_bits=bits, progress=False)
    config = Config.from_json(out)
    r = inspect_model(out)
    assert r["format"] == "bcnp"
    assert r["quantization"]["bits"] == bits and r["quantization"]["source_dtype"] == "bfloat16"
    expected = expected_converted_shapes(config, bits, "bfloat16")   # float tensors keep the source dtype
    assert [t["name"] for t in r["tensors"]] == list(expected)
    assert all((t["dtype"], tuple(t["shape"])) == expected[t["name"]] for t in r["tensors"])
    assert r["stored_bytes"] == r["memory"]["weights"][precision]     # the prediction, from the config alone
    assert r["parameters"] == inspect_model(B13 / "hf")["parameters"]  # quantizing changes bytes, not parameters


def test_generation_defaults_come_from_the_checkpoint(tmp_path):
    r = inspect_model(B13 / "hf")
    assert r["generation"]["temperature"] == 0.3 and r["generation"]["top_k"] == 5
    assert r["generation"]["user_token_id"] == 195 and r["generation"]["assistant_token_id"] == 196
    assert r["generation_source"].endswith("generation_config.json")

    model = shutil.copytree(B7 / "hf", tmp_path / "model")
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "max_new_tokens": 64}))
    g = inspect_model(model)["generation"]
    assert (g["temperature"], g["max_new_tokens"], g["top_p"]) == (0.7, 64, 0.85)   # unset keys: the defaults
    (model / "generation_config.json").unlink()
    r = inspect_model(model)
    assert r["generation_source"] == "defaults" and r["generation"]["temperature"] == 0.3


# --- the command line --------------------------------------------------------------------------------------------

def test_cli_preset_13b_text():
    p = run_cli("--preset", "13b")
    assert p.returncode == 0, p.stderr
    assert "13,264,901,120" in p.stdout and "ALiBi" in p.stdout and "40 x head_dim 128" in p.stdout
    # One line per name pattern, each with its count: 1 + 7 per-layer patterns x 40 + 2 = 283 tensors.
    lines = [line.split() for line in p.stdout.splitlines() if line.startswith("  model.") or
             line.startswith("  lm_head.")]
    assert len(lines) == 10 and sum(int(parts[1]) for parts in lines) == 283
    assert "  model.layers.{i}.self_attn.W_pack.weight" in p.stdout


def test_cli_preset_7b_json():
    p = run_cli("--preset", "7b", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["parameters"]["total"] == 7_000_559_616
    assert r["architecture"]["positions"] == "rope" and len(r["position_encoding"]["rope_inv_freq"]) == 64
    assert len(r["tensors"]) == 227                             # --json always lists every tensor


def test_cli_fixture_directory_lists_each_tensor_with_tensors_flag():
    names = list(Config.from_json(B13 / "hf").weight_shapes())
    short = run_cli(B13 / "hf-safetensors")
    full = run_cli(B13 / "hf-safetensors", "--tensors")
    assert short.returncode == full.returncode == 0, short.stderr + full.stderr
    assert "model.layers.3.mlp.up_proj.weight" not in short.stdout            # grouped as model.layers.{i}.
    listed = [line.split()[0] for line in full.stdout.splitlines() if line.split()[:1] and
              line.split()[0] in names]
    assert listed == names
    assert "model-00003-of-00003.safetensors" in full.stdout and "generation_config.json" in full.stdout


def test_cli_converted_int4_directory(tmp_path):
    out = convert(B13 / "hf", tmp_path / "q4", quantize_bits=4, progress=False)
    p = run_cli(out, "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["quantization"]["bits"] == 4
    dtypes = {t["name"]: t["dtype"] for t in r["tensors"]}
    assert dtypes["model.layers.0.mlp.down_proj.qweight"] == "uint8" and dtypes["lm_head.qweight"] == "int8"
    text = run_cli(out).stdout
    assert "int4 (Q4_0" in text and "lm_head int8" in text


@pytest.mark.parametrize("args, code", [(["/no/such/model"], 1), ([], 2), (["--preset", "13b", "x"], 2),
                                        (["--preset", "70b"], 2), (["tests"], 1)])
def test_cli_errors_are_one_line(args, code):
    p = run_cli(*args)
    assert p.returncode == code
    assert p.stdout == ""
    assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("error: ")


def test_cli_wrong_shape_names_the_tensor(tmp_path):
    model = shutil.copytree(B7 / "hf", tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] += 1
    (model / "config.json").write_text(json.dumps(config))
    p = run_cli(model)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1
    assert "mlp.gate_proj.weight" in p.stderr and "(173, 64)" in p.stderr
