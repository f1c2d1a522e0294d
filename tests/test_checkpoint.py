"""The torch-free checkpoint reader: torch .bin zips and safetensors, as torch and HF write them, and as they
must not be (forbidden pickle globals, truncation, missing shards, wrong shapes, unknown dtypes)."""
import collections
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bcnp._dtypes import bf16_to_f32, f32_to_bf16
from bcnp.checkpoint import CheckpointError, read_checkpoint, read_safetensors, read_torch_bin
from bcnp.tensor import to_float32
from bcnp.config import Config
from conftest import FIXTURES, MODELS
from torch_zip import NUMPY, STORAGE_CLASSES, Call, Global, Storage, contiguous_state, tensor, write_torch_zip

# --- the fixtures: .bin and safetensors agree -------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_bin_and_safetensors_hold_the_same_tensors(model):
    config = Config.from_json(FIXTURES / model / "hf")
    from_bin = read_checkpoint(FIXTURES / model / "hf", config.weight_shapes())
    from_st = read_checkpoint(FIXTURES / model / "hf-safetensors", config.weight_shapes())
    assert set(from_bin) == set(from_st) == set(config.weight_shapes())
    for name, t in from_bin.items():
        s = from_st[name]
        assert (t.dtype, t.shape, t.nbytes) == (s.dtype, s.shape, s.nbytes) and t.dtype == config.torch_dtype
        assert np.array_equal(t.numpy(), s.numpy())
        assert np.array_equal(t.float32(), s.float32())
        assert isinstance(t.numpy().base, np.memmap) or isinstance(t.numpy(), np.memmap)  # mapped, not copied


def test_float16_fixture_matches_the_safetensors_package():
    import safetensors.numpy

    directory = FIXTURES / "b7-rope-h4-l3-fp16" / "hf-safetensors"
    ours = read_checkpoint(directory)
    theirs = {}
    for path in sorted(directory.glob("*.safetensors")):
        theirs.update(safetensors.numpy.load_file(path))
    theirs = {k: v for k, v in theirs.items() if not k.endswith("inv_freq")}
    assert set(ours) == set(theirs)
    for name, values in theirs.items():
        assert ours[name].numpy().dtype == values.dtype and np.array_equal(ours[name].numpy(), values)


def test_rotary_inv_freq_buffers_are_skipped():
    index = json.loads((FIXTURES / "b7-rope-h4-l3-fp16" / "hf" / "pytorch_model.bin.index.json").read_text())
    assert any(k.endswith("rotary_emb.inv_freq") for k in index["weight_map"])
    assert not any(k.endswith("inv_freq") for k in read_checkpoint(FIXTURES / "b7-rope-h4-l3-fp16" / "hf"))
    buffers = {}
    read_checkpoint(FIXTURES / "b7-rope-h4-l3-fp16" / "hf", buffers=buffers)      # ... or kept aside
    assert sorted(buffers) == [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(3)]


@pytest.mark.parametrize("layout", ["hf", "hf-safetensors"])
def test_reads_single_files_and_unindexed_shards(tmp_path, layout):
    """Sharded without the index, and a single pytorch_model.bin / model.safetensors, read the same."""
    source = FIXTURES / "b13-alibi-h8-l4-bf16" / layout
    reference = read_checkpoint(source)
    unindexed = shutil.copytree(source, tmp_path / "unindexed")
    for index in unindexed.glob("*.index.json"):
        index.unlink()
    assert {n: t.path for n, t in read_checkpoint(unindexed).items()}.keys() == reference.keys()

    single = tmp_path / "single"
    single.mkdir()
    first = sorted(p.name for p in source.glob("*model-00001-*"))[0]
    shutil.copy(source / first, single / ("pytorch_model.bin" if layout == "hf" else "model.safetensors"))
    tensors = read_checkpoint(single)
    reader = read_torch_bin if layout == "hf" else read_safetensors
    assert tensors.keys() == reader(source / first).keys()
    for name, t in tensors.items():
        assert np.array_equal(t.numpy(), reference[name].numpy())


def test_safetensors_preferred_when_both_exist(tmp_path):
    both = shutil.copytree(FIXTURES / "b7-rope-h4-l3-fp16" / "hf", tmp_path / "both")
    for p in (FIXTURES / "b7-rope-h4-l3-fp16" / "hf-safetensors").glob("model*"):
        shutil.copy(p, both)
    assert all(t.path.endswith(".safetensors") for t in read_checkpoint(both).values())


# --- hand-made torch zips: views, dtypes -------------------------------------------------------------------------

@st.composite
def strided_views(draw):
    """A numpy view (transpose + slices) of a C-contiguous base, as torch would store it: base, view."""
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    base = np.arange(int(np.prod(shape))).reshape(shape)
    view = base.transpose(draw(st.permutations(range(len(shape)))))
    slices = tuple(slice(draw(st.integers(0, n - 1)), None, draw(st.integers(1, 2))) for n in view.shape)
    return base, view[slices]


@settings(max_examples=40, deadline=None)
@given(strided_views(), st.sampled_from(list(STORAGE_CLASSES)))
def test_views_of_a_shared_storage_read_as_numpy_views(case, dtype):
    base, view = case              # base = arange: each element of the view is its own position in the storage
    values = base.astype(NUMPY[dtype])
    offset = int(view.flat[0])
    strides = tuple(s // base.itemsize for s in view.strides)      # torch counts elements, not bytes
    storage = Storage(STORAGE_CLASSES[dtype], "0", values.size)
    state = {"whole": tensor(storage, 0, values.shape, np.array(values.strides) // values.itemsize),
             "view": tensor(storage, offset, view.shape, strides)}
    with tempfile.TemporaryDirectory() as tmp:
        tensors = read_torch_bin(write_torch_zip(os.path.join(tmp, "v.bin"), state, {"0": values.tobytes()}))
        expected = values.reshape(-1)[view]
        got = tensors["view"].numpy()
        assert got.dtype == NUMPY[dtype] and got.shape == expected.shape and np.array_equal(got, expected)
        assert np.array_equal(tensors["whole"].numpy(), values)
        assert tensors["view"].dtype == dtype and tensors["view"].nbytes == expected.nbytes
        del got, tensors


def test_transpose_and_offset_slice_share_one_storage(tmp_path):
    values = np.arange(24, dtype=np.float32).reshape(4, 6)
    storage = Storage("FloatStorage", "7", 24)
    state = {"w": tensor(storage, 0, (4, 6), (6, 1)),
             "w.T": tensor(storage, 0, (6, 4), (1, 6)),
             "rows_1_2": tensor(storage, 6, (2, 6), (6, 1)),
             "column_2": tensor(storage, 2, (4,), (6,))}
    tensors = read_torch_bin(write_torch_zip(tmp_path / "views.bin", state, {"7": values.tobytes()}))
    assert np.array_equal(tensors["w.T"].numpy(), values.T)
    assert np.array_equal(tensors["rows_1_2"].numpy(), values[1:3])
    assert np.array_equal(tensors["column_2"].float32(), values[:, 2])
    assert np.array_equal(tensors["w.T"].float16(), values.T.astype(np.float16))
    assert np.array_equal(tensors["w.T"].float32(rows=slice(2, 4)), values.T[2:4])


@pytest.mark.parametrize("dtype", list(STORAGE_CLASSES))
def test_every_supported_dtype_reads_back(tmp_path, dtype):
    rng = np.random.default_rng(0)
    if dtype == "bfloat16":
        values = f32_bits_to_bf16(rng.standard_normal((3, 5), dtype=np.float32))
    elif dtype in ("int8", "uint8"):
        values = rng.integers(np.iinfo(NUMPY[dtype]).min, np.iinfo(NUMPY[dtype]).max, (3, 5)).astype(NUMPY[dtype])
    else:
        values = rng.standard_normal((3, 5)).astype(NUMPY[dtype])
    state, storages = contiguous_state("t", values, dtype)
    t = read_torch_bin(write_torch_zip(tmp_path / "t.bin", state, storages))["t"]
    assert (t.dtype, t.shape, t.nbytes) == (dtype, (3, 5), values.nbytes)
    assert t.numpy().dtype == values.dtype and np.array_equal(t.numpy(), values)
    widened = (values.astype(np.uint32) << 16).view(np.float32) if dtype == "bfloat16" else values.astype(np.float32)
    assert t.float32().dtype == np.float32 and np.array_equal(t.float32(), widened)


def test_parameter_and_rebuild_from_type_wrappers_are_understood(tmp_path):
    values = np.arange(6, dtype=np.float16).reshape(2, 3)
    storage = Storage("HalfStorage", "0", 6)
    plain = tensor(storage, 0, (2, 3), (3, 1))
    rebuild_v2 = Global("torch._utils", "_rebuild_tensor_v2")
    state = {"param": Call(Global("torch._utils", "_rebuild_parameter"), plain, True, collections.OrderedDict()),
             "typed": Call(Global("torch._tensor", "_rebuild_from_type_v2"), rebuild_v2,
                           Global("torch.nn.parameter", "Parameter"),
                           (storage, 0, (2, 3), (3, 1), False, collections.OrderedDict()), {})}
    tensors = read_torch_bin(write_torch_zip(tmp_path / "p.bin", state, {"0": values.tobytes()}))
    assert np.array_equal(tensors["param"].numpy(), values) and np.array_equal(tensors["typed"].numpy(), values)


# --- bfloat16 --------------------------------------------------------------------------------------------------

def f32_bits_to_bf16(x):
    """FORMATS.md's round-to-nearest-even formula."""
    u = x.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


not_nan_bf16 = st.integers(0, 0xFFFF).filter(lambda u: (u & 0x7FFF) <= 0x7F80)


@settings(max_examples=60, deadline=None)
@given(st.lists(not_nan_bf16, min_size=1, max_size=64))
def test_bfloat16_widens_to_the_float32_with_those_top_bits(bits):
    bits = np.array(bits, dtype=np.uint16)
    header = json.dumps({"t": {"dtype": "BF16", "shape": [len(bits)], "data_offsets": [0, bits.nbytes]}}).encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.safetensors")
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header + bits.tobytes())
        t = read_safetensors(path)["t"]
        assert np.array_equal(t.numpy(), bits)
        widened = to_float32(t.numpy(), "bfloat16")       # every bit pattern, NaN and infinity included
        finite = (bits & 0x7F80) != 0x7F80
        if finite.all():
            assert np.array_equal(t.float32(), widened)
        else:                                             # a weight that is not finite is refused by name
            with pytest.raises(CheckpointError, match=r"tensor t holds a non-finite value at index \(\d+,\)"):
                t.float32()
        del t
    assert widened.dtype == np.float32
    assert np.array_equal(widened.view(np.uint32) >> 16, bits) and not (widened.view(np.uint32) & 0xFFFF).any()


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(width=32, allow_nan=False)))
def test_float32_to_bfloat16_rounds_like_the_formula_and_round_trips(x):
    bits = np.empty(x.shape, np.uint16)
    f32_to_bf16(x, bits)
    assert np.array_equal(bits, f32_bits_to_bf16(x))
    back = np.empty(x.shape, np.float32)
    bf16_to_f32(bits, back)
    again = np.empty(x.shape, np.uint16)
    f32_to_bf16(back, again)
    assert np.array_equal(again, bits)                              # bfloat16 values are fixed points
    finite = np.isfinite(back)
    half_ulp = np.maximum(np.abs(x[finite]) * 2.0**-8, 2.0**-134)      # 8 significant bits; subnormal spacing
    assert np.all(np.abs(back[finite] - x[finite]) <= half_ulp)


def test_bfloat16_to_float16_refuses_what_float16_cannot_hold(tmp_path):
    def bf16_tensor(value_bits):
        bits = np.array([0x3F80, value_bits], dtype=np.uint16)         # 1.0 and the value under test
        state, storages = contiguous_state("model.norm.weight", bits, "bfloat16")
        return read_torch_bin(write_torch_zip(tmp_path / f"{value_bits}.bin", state, storages))["model.norm.weight"]

    assert bf16_tensor(0x477F).float16().tolist() == [1.0, 65280.0]   # the largest bfloat16 below 65504
    for bits, what in [(0x4780, "65536"), (0xC780, "65536"), (0x7F80, "non-finite"), (0x7FC0, "non-finite")]:
        with pytest.raises(CheckpointError, match=what) as e:
            bf16_tensor(bits).float16()
        assert "model.norm.weight" in str(e.value) and f"{bits}.bin" in str(e.value)


# --- what must be refused ------------------------------------------------------------------------------------

@pytest.mark.parametrize("module,name,arg", [
    ("os", "system", "touch {marker}"),
    ("posix", "system", "touch {marker}"),
    ("builtins", "eval", "open({marker!r}, 'w').close()"),
    ("builtins", "exec", "open({marker!r}, 'w').close()"),
    ("subprocess", "check_call", ["touch", "{marker}"]),
])
def test_forbidden_globals_are_refused_and_nothing_runs(tmp_path, module, name, arg):
    marker = str(tmp_path / "pwned")
    arg = [a.format(marker=marker) for a in arg] if isinstance(arg, list) else arg.format(marker=marker)
    values = np.zeros(4, np.float32)
    state, storages = contiguous_state("model.norm.weight", values, "float32")
    state["evil"] = Call(Global(module, name), arg)
    path = write_torch_zip(tmp_path / "evil.bin", state, storages)
    with pytest.raises(CheckpointError, match=rf"{module}\.{name}") as e:
        read_torch_bin(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(marker)


def test_forbidden_global_hidden_inside_a_tensor_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    storage = Storage("FloatStorage", "0", 4)
    hooks = Call(Global("os", "system"), f"touch {marker}")
    state = {"w": Call(Global("torch._utils", "_rebuild_tensor_v2"), storage, 0, (4,), (1,), False, hooks)}
    with pytest.raises(CheckpointError, match=r"os\.system"):
        read_torch_bin(write_torch_zip(tmp_path / "hooks.bin", state, {"0": bytes(16)}))
    assert not marker.exists()


def test_nested_archive_load_from_bytes_is_refused(tmp_path):
    state = {"w": Call(Global("torch.storage", "_load_from_bytes"), b"PK\x03\x04 a nested archive")}
    with pytest.raises(CheckpointError, match=r"torch\.storage\._load_from_bytes") as e:
        read_torch_bin(write_torch_zip(tmp_path / "nested.bin", state, {}))
    assert "nested" in str(e.value) and "nested.bin" in str(e.value)


def test_unknown_dtypes_are_refused_naming_the_tensor(tmp_path):
    storage = Storage("LongStorage", "0", 3)
    state = {"model.norm.weight": tensor(storage, 0, (3,), (1,))}
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*int64") as e:
        read_torch_bin(write_torch_zip(tmp_path / "long.bin", state, {"0": bytes(24)}))
    assert "long.bin" in str(e.value)
    # A storage class torch does not have is just another forbidden global.
    state = {"w": tensor(Storage("Float8Storage", "0", 3), 0, (3,), (1,))}
    with pytest.raises(CheckpointError, match=r"torch\.Float8Storage"):
        read_torch_bin(write_torch_zip(tmp_path / "f8.bin", state, {"0": bytes(3)}))
    # safetensors: a dtype outside F32/F16/BF16/I8/U8.
    header = json.dumps({"lm_head.weight": {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "f64.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(CheckpointError, match=r"f64\.safetensors: tensor lm_head\.weight .*F64"):
        read_safetensors(tmp_path / "f64.safetensors")


def test_big_endian_checkpoints_are_refused(tmp_path):
    state, storages = contiguous_state("w", np.zeros(2, np.float32), "float32")
    with pytest.raises(CheckpointError, match="big"):
        read_torch_bin(write_torch_zip(tmp_path / "be.bin", state, storages, byteorder="big"))
    # No byteorder record means little-endian (older torch).
    assert read_torch_bin(write_torch_zip(tmp_path / "old.bin", state, storages, byteorder=None))["w"].shape == (2,)


def test_storage_too_small_for_the_view_is_refused(tmp_path):
    state = {"w": tensor(Storage("FloatStorage", "0", 4), 2, (2, 2), (2, 1))}    # reaches element 5 of 4
    with pytest.raises(CheckpointError, match=r"tensor w"):
        read_torch_bin(write_torch_zip(tmp_path / "short.bin", state, {"0": bytes(16)}))
    state = {"w": tensor(Storage("FloatStorage", "0", 8), 0, (8,), (1,))}         # numel 8, 16 bytes stored
    with pytest.raises(CheckpointError, match=r"tensor w.*truncated"):
        read_torch_bin(write_torch_zip(tmp_path / "short2.bin", state, {"0": bytes(16)}))


def test_truncated_files_are_refused(tmp_path):
    shard = FIXTURES / "b13-alibi-h8-l4-bf16" / "hf" / "pytorch_model-00002-of-00003.bin"
    cut = tmp_path / shard.name
    cut.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{cut.name}.*(truncated|zip)"):
        read_torch_bin(cut)

    shard = FIXTURES / "b13-alibi-h8-l4-bf16" / "hf-safetensors" / "model-00002-of-00003.safetensors"
    cut = tmp_path / shard.name
    cut.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{cut.name}: tensor \S+: data ends at byte .*truncated"):
        read_safetensors(cut)
    cut.write_bytes(shard.read_bytes()[:50])                               # inside the header
    with pytest.raises(CheckpointError, match=rf"{cut.name}.*truncated"):
        read_safetensors(cut)


@pytest.mark.parametrize("layout,shard", [("hf", "pytorch_model-00002-of-00003.bin"),
                                          ("hf-safetensors", "model-00002-of-00003.safetensors")])
def test_missing_shard_is_named(tmp_path, layout, shard):
    directory = shutil.copytree(FIXTURES / "b13-alibi-h8-l4-bf16" / layout, tmp_path / "ckpt")
    (directory / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"{shard}: missing shard"):
        read_checkpoint(directory)
    for index in directory.glob("*.index.json"):                          # without the index, by numbering
        index.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard}: missing shard"):
        read_checkpoint(directory)


def test_tensor_not_where_the_index_says_is_refused(tmp_path):
    directory = shutil.copytree(FIXTURES / "b13-alibi-h8-l4-bf16" / "hf-safetensors", tmp_path / "ckpt")
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00003\.safetensors: tensor lm_head\.weight is missing"):
        read_checkpoint(directory)


def test_shapes_are_checked_against_the_config():
    directory = FIXTURES / "b7-rope-h4-l3-fp16" / "hf"
    expected = Config.from_json(directory).weight_shapes()
    assert set(read_checkpoint(directory, expected)) == set(expected)

    wrong = dict(expected, **{"model.layers.1.mlp.down_proj.weight": (64, 171)})
    with pytest.raises(CheckpointError, match=r"pytorch_model-0000\d-of-00002\.bin: tensor "
                                              r"model\.layers\.1\.mlp\.down_proj\.weight has shape \(64, 172\), "
                                              r"expected \(64, 171\)"):
        read_checkpoint(directory, wrong)

    fewer = {k: v for k, v in expected.items() if k != "model.norm.weight"}
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight is not part of the model"):
        read_checkpoint(directory, fewer)

    more = dict(expected, **{"model.layers.3.input_layernorm.weight": (64,)})
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.input_layernorm\.weight is missing"):
        read_checkpoint(directory, more)

    as_dtype = {k: ("float16", v) for k, v in expected.items()}
    assert len(read_checkpoint(directory, as_dtype)) == len(expected)
    as_dtype["lm_head.weight"] = ("bfloat16", expected["lm_head.weight"])
    with pytest.raises(CheckpointError, match=r"tensor lm_head\.weight has dtype float16, expected bfloat16"):
        read_checkpoint(directory, as_dtype)


def test_a_directory_without_checkpoint_files_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: no checkpoint files"):
        read_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        read_checkpoint(tmp_path / "nowhere")


def test_reading_never_imports_torch():
    code = ("import sys, bcnp.checkpoint, bcnp.convert\n"
            f"bcnp.checkpoint.read_checkpoint({str(FIXTURES / 'b13-alibi-h8-l4-bf16' / 'hf')!r})\n"
            "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules), 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=FIXTURES.parent.parent)
