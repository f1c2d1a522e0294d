"""Hand-made hostile checkpoints, one per kind of attack: each ends in one CheckpointError that names the file,
in bounded memory and time, and nothing in the file reaches the terminal unescaped or unbounded."""
import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from bcnp.checkpoint import CheckpointError, read_checkpoint, read_safetensors, read_torch_bin
from conftest import FIXTURES
from torch_zip import (Storage, TorchPickler, deflated_zeros, member_data_offset, op_global, op_int, op_state_dict,
                       op_storage, op_str, op_tensor, op_tuple, raw_zip, tensor, with_central_field,
                       write_pickle_zip, write_torch_zip)

TORCH_SHARD = FIXTURES / "b7-rope-h4-l3-fp16" / "hf" / "pytorch_model-00001-of-00002.bin"   # real torch.save
PREFIX = "pytorch_model-00001-of-00002/"


def refused(path, reader=read_torch_bin, match=None):
    """The CheckpointError `reader` raises for `path`, checked to name the file and be one bounded line."""
    with pytest.raises(CheckpointError, match=match) as e:
        reader(path)
    message = str(e.value)
    assert os.path.basename(path) in message and "\n" not in message and "\x1b" not in message
    assert len(message) < 1000
    return message


def patched_shard(tmp_path, data, name="shard.bin"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- torch zips ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("member", ["data.pkl", "byteorder", "version", ".format_version"])
def test_a_bad_crc_in_any_record_is_refused(tmp_path, member):
    data = bytearray(TORCH_SHARD.read_bytes())
    data[member_data_offset(bytes(data), PREFIX + member)] ^= 0x01
    refused(patched_shard(tmp_path, bytes(data)), match="CRC")


def test_a_storage_whose_directory_entry_lies_is_refused(tmp_path):
    """Storages are mapped, not checksummed; their CRC and sizes must still agree with the data descriptor."""
    data = TORCH_SHARD.read_bytes()
    for field, value in [("crc", 0x12345678), ("size", 65535), ("compressed_size", 65600)]:
        refused(patched_shard(tmp_path, with_central_field(data, "data/0", field, value)), match="disagrees")


@pytest.mark.parametrize("field,value,match", [
    ("flags", 0x0809, "encrypted"),                          # bit 0: encrypted
    ("method", 12, "compression method 12"),                 # bzip2
    ("method", 99, "compression method 99"),                 # AES
    ("version_needed", 99, "version 9.9"),
    ("header_offset", 0xFFFFFFF0, "corrupt"),                # a seek past the end
    ("header_offset", 0, "corrupt"),                         # another member's header
])
@pytest.mark.parametrize("member", ["byteorder", "data/1"])
def test_zip_features_torch_never_writes_are_refused(tmp_path, member, field, value, match):
    data = with_central_field(TORCH_SHARD.read_bytes(), member, field, value)
    refused(patched_shard(tmp_path, data), match=match)


def test_an_undecodable_member_name_is_refused(tmp_path):
    data = bytearray(TORCH_SHARD.read_bytes())
    with zipfile.ZipFile(TORCH_SHARD) as z:
        start = z.start_dir
    name_at = data.index(b"byteorder", start)
    data[name_at] = 0xFF                                     # the UTF-8 flag is set: 0xFF cannot start a character
    refused(patched_shard(tmp_path, bytes(data)), match="not a torch zip checkpoint")


def test_two_data_pkl_archives_in_one_zip_are_refused(tmp_path):
    state, storages = {"w": tensor(Storage("FloatStorage", "0", 2), 0, (2,), (1,))}, {"0": bytes(8)}
    path = write_torch_zip(tmp_path / "two.bin", state, storages, prefix="a")
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(state)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("b/data.pkl", buf.getvalue())
    assert "2 data.pkl" in refused(path)


def test_a_member_given_twice_is_refused(tmp_path):
    path = write_pickle_zip(tmp_path / "twice.bin", op_state_dict([]))
    with pytest.warns(UserWarning), zipfile.ZipFile(path, "a") as z:
        z.writestr("archive/byteorder", "big")
    refused(path, match="appears twice")


def test_members_that_overlap_are_refused(tmp_path):
    """A forged directory could alias one storage's bytes as another's; every member has bytes of its own."""
    pkl = op_state_dict([(f"w{k}", op_tensor(op_storage(str(k), 2), 0, (2,), (1,))) for k in (0, 1)])
    inner = b"\x01" * 8
    nested = raw_zip([("archive/data/1", inner, {})])[: 30 + len("archive/data/1") + 8]   # a local entry only
    data = raw_zip([("archive/data.pkl", pkl, {}), ("archive/data/0", nested, {})],
                   aliases=[("archive/data/1", inner, 30 + len("archive/data.pkl") + len(pkl) + 30 + 14)])
    assert zipfile.ZipFile(io.BytesIO(data)).read("archive/data/1") == inner     # a valid zip to zipfile
    refused(patched_shard(tmp_path, data), match="overlap")


# --- data.pkl ------------------------------------------------------------------------------------------------

ONE_TENSOR = op_tensor(op_storage("0", 4), 0, (4,), (1,))


def pickle_zip(tmp_path, data_pkl):
    return write_pickle_zip(tmp_path / "state.bin", data_pkl, {"0": np.arange(4, dtype=np.float32).tobytes()})


def test_the_raw_pickle_helpers_write_a_readable_state_dict(tmp_path):
    tensors = read_torch_bin(pickle_zip(tmp_path, op_state_dict([("w", ONE_TENSOR)])))
    assert tensors["w"].float32().tolist() == [0, 1, 2, 3]


def build(target_opcodes, attribute, value_opcodes):
    """Opcodes that BUILD (set an attribute of) the object `target_opcodes` left on the stack."""
    return target_opcodes + pickle.EMPTY_DICT + op_str(attribute) + value_opcodes + pickle.SETITEM + pickle.BUILD


def test_build_cannot_tamper_with_a_tensor_after_it_was_built(tmp_path):
    tampered = build(ONE_TENSOR, "size", op_tuple([op_int(10**6)]))
    refused(pickle_zip(tmp_path, op_state_dict([("w", tampered)])), match="sets attributes of a _TensorRecord")


def test_build_cannot_tamper_with_the_globals_of_later_reads(tmp_path):
    poison = build(op_global("torch", "FloatStorage"), "dtype", op_str("float16"))
    refused(pickle_zip(tmp_path, op_state_dict([("w", poison + pickle.TUPLE1)])), match="sets attributes")
    assert read_torch_bin(pickle_zip(tmp_path, op_state_dict([("w", ONE_TENSOR)])))["w"].dtype == "float32"


def test_torch_state_dict_metadata_is_still_read(tmp_path):
    """model.state_dict() is an OrderedDict with a `_metadata` attribute: pickled with BUILD on the dict."""
    state = collections.OrderedDict(w=tensor(Storage("FloatStorage", "0", 4), 0, (4,), (1,)))
    state._metadata = collections.OrderedDict([("", {"version": 1})])
    for protocol in (2, 4):                                  # 4: FRAME, SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL
        path = write_torch_zip(tmp_path / f"p{protocol}.bin", state, {"0": bytes(16)})
        assert read_torch_bin(path)["w"].shape == (4,)


@pytest.mark.parametrize("size", [(2**63,), (2**62,), (-1,), (2**31, 2**31, 2**31)])
def test_sizes_beyond_int64_are_refused_not_overflowed(tmp_path, size):
    entry = op_tensor(op_storage("0", 4), 0, size, (1,) * len(size))
    refused(pickle_zip(tmp_path, op_state_dict([("w", entry)])), match="invalid size|9-byte integer")


def test_a_deeply_nested_key_is_refused_without_recursion(tmp_path):
    deep = op_int(0) + pickle.TUPLE1 * 100_000
    data = pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + deep + ONE_TENSOR + pickle.SETITEM + pickle.STOP
    refused(pickle_zip(tmp_path, data), match="uses a tuple as a key")


@pytest.mark.parametrize("data_pkl,match", [
    (op_state_dict([("w", ONE_TENSOR)])[:-20], "truncated"),
    (pickle.PROTO + b"\x02" + pickle.EMPTY_LIST + pickle.STOP, "opcode EMPTY_LIST"),
    (pickle.PROTO + b"\x02" + pickle.BINGET + b"\x07" + pickle.STOP, "memo slot 7"),
    (pickle.PROTO + b"\x02" + pickle.SETITEM + pickle.STOP, "more objects than its stack"),
    (pickle.PROTO + b"\x02" + op_global("os", "system") + pickle.STOP, r"os\.system"),
    (pickle.PROTO + b"\x02" + pickle.TUPLE + pickle.STOP, "no MARK"),
    (op_state_dict([("w", op_int(3))]), "is a int, not a tensor"),
    (op_state_dict([("w", ONE_TENSOR), ("w", ONE_TENSOR)]), "key w twice"),
    (op_state_dict([("w", op_tuple([op_str("storage")]) + pickle.BINPERSID)]), "persistent id"),
    (pickle.PROTO + b"\x02" + pickle.LONG1 + b"\x09" + bytes(9) + pickle.STOP, "9-byte integer"),
])
def test_errors_inside_the_pickle_name_the_file(tmp_path, data_pkl, match):
    refused(pickle_zip(tmp_path, data_pkl), match=match)


def test_a_name_with_control_characters_cannot_paint_the_terminal(tmp_path):
    name = "model.norm.weight\nerror: all good\x1b[32m" + "x" * 10**6
    message = refused(pickle_zip(tmp_path, op_state_dict([(name, op_int(3))])))
    assert "\\n" in message and "\\x1b" in message


# --- bombs: memory and time stay bounded -------------------------------------------------------------------------

PEAK_RSS = """
import sys, time
from bcnp.checkpoint import CheckpointError, read_torch_bin, read_safetensors
start = time.perf_counter()
try:
    (read_safetensors if sys.argv[1].endswith('.safetensors') else read_torch_bin)(sys.argv[1])
    outcome = 'loaded'
except CheckpointError as e:
    outcome = str(e)
seconds = time.perf_counter() - start
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest) through fork and exec.
peak_kib = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM'))
print(peak_kib // 1024, seconds, outcome)
"""


def peak_rss_mib(path):
    """(peak resident MiB, seconds, outcome) of reading `path` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))).stdout
    rss, seconds, outcome = out.split(" ", 2)
    return int(rss), float(seconds), outcome.strip()


def bomb_zips(tmp_path):
    """name -> path of small zips whose records inflate to far more than a state dict could need."""
    gib = deflated_zeros(1024)                               # 1 GiB of zeros in ~1 MB
    pkl = op_state_dict([])
    little = [("archive/byteorder", b"little", {})]
    return {
        "data.pkl of 1 GiB": raw_zip([("archive/data.pkl", gib, {"method": 8, "size": 2**30})] + little),
        "data.pkl claiming 200 bytes": raw_zip([("archive/data.pkl", gib, {"method": 8, "size": 200})] + little),
        "byteorder of 64 MiB": raw_zip([("archive/data.pkl", pkl, {}),
                                        ("archive/byteorder", deflated_zeros(64), {"method": 8, "size": 2**26})]),
        "byteorder claiming 6 bytes": raw_zip([("archive/data.pkl", pkl, {}),
                                               ("archive/byteorder", deflated_zeros(64), {"method": 8, "size": 6})]),
        "memo index 2**26": raw_zip([("archive/data.pkl", b"\x80\x02}r\x00\x00\x00\x04.", {})] + little),
        "10 MB of EMPTY_DICT": raw_zip([("archive/data.pkl", b"\x80\x02" + b"}" * 10**7 + b".", {})] + little),
    }


@pytest.fixture(scope="module")
def baseline_rss():
    """Peak MiB of reading a real shard: the interpreter, NumPy and bcnp."""
    rss, _, outcome = peak_rss_mib(TORCH_SHARD)
    assert outcome == "loaded"
    return rss


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory is read from Linux's /proc")
def test_zip_and_pickle_bombs_stay_within_bounded_memory(tmp_path, baseline_rss):
    baseline = baseline_rss
    for what, data in bomb_zips(tmp_path).items():
        path = patched_shard(tmp_path, data, "bomb.bin")
        rss, seconds, outcome = peak_rss_mib(path)
        assert rss < baseline + 100 and seconds < 5, (what, rss, baseline, seconds)
        assert "bomb.bin" in outcome or (what == "memo index 2**26" and outcome == "loaded"), (what, outcome)


# --- safetensors ---------------------------------------------------------------------------------------------

def safetensors_file(tmp_path, header, data=b"", name="t.safetensors"):
    """A safetensors file from a header (a dict, or raw bytes) and data bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def entry(begin, end, dtype="F32", shape=None):
    return {"dtype": dtype, "shape": [(end - begin) // 4] if shape is None else shape, "data_offsets": [begin, end]}


def reference_refuses(path):
    from safetensors import safe_open
    try:
        with safe_open(path, framework="numpy") as f:
            f.keys()
    except Exception:  # noqa: BLE001 - SafetensorError, or a parse error of the reference's own
        return True
    return False


@pytest.mark.parametrize("header,data,match", [
    ({"a": entry(0, 8), "b": entry(0, 8)}, bytes(8), "overlaps tensor a"),      # lm_head aliasing embed_tokens
    ({"a": entry(0, 8), "b": entry(4, 12)}, bytes(12), "overlaps"),
    ({"a": entry(4, 12)}, bytes(12), "bytes 0..3 in no tensor"),
    ({"a": entry(0, 8)}, bytes(9), "1 bytes after the last tensor"),
    ({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "unsupported dtype a list"),
    ({"a": entry(0, 8, shape=[2**64])}, bytes(8), "shape must be"),
    ({"a": entry(0, 8, shape=[True, 2])}, bytes(8), "shape must be"),
    ({"a": entry(0, 8, shape=[-2])}, bytes(8), "shape must be"),
    ({"a": entry(0, 8, shape=[2.0])}, bytes(8), "shape must be"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 2**64]}}, bytes(8), "two counts"),
    ({"a": [1]}, b"", "not an object"),
    ({"__metadata__": {"format": 1}}, b"", "__metadata__"),
    (b'{"a":' + json.dumps(entry(0, 8)).encode() + b',"a":' + json.dumps(entry(0, 8)).encode() + b"}",
     bytes(8), "names a twice"),
    (b"[" * 100_000, b"", "nested too deeply"),
    (b'{"\xff": 1}', b"", "not UTF-8"),
    (b"{", b"", "not JSON"),
])
def test_malformed_safetensors_headers_are_refused(tmp_path, header, data, match):
    path = safetensors_file(tmp_path, header, data)
    refused(path, read_safetensors, match)
    if "twice" not in match:                             # the reference keeps the last of duplicate keys
        assert reference_refuses(path)                   # we are at least as strict as the reference


def test_an_empty_tensor_too_big_for_numpy_is_refused(tmp_path):
    """Valid to the reference library, but numpy cannot even shape an empty (0, 2**61) float32 array."""
    refused(safetensors_file(tmp_path, {"a": entry(0, 0, shape=[0, 2**61])}), read_safetensors, "shape must be")


def test_what_the_reference_accepts_we_read_alike(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "b": entry(8, 16), "empty": entry(0, 0, shape=[0, 3]),
              "a": entry(0, 8)}
    path = safetensors_file(tmp_path, header, np.arange(4, dtype=np.float32).tobytes())
    assert not reference_refuses(path)
    tensors = read_safetensors(path)
    assert tensors["a"].float32().tolist() == [0, 1] and tensors["b"].float32().tolist() == [2, 3]
    assert tensors["empty"].shape == (0, 3)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory is read from Linux's /proc")
def test_a_header_over_16_mib_is_refused_unread(tmp_path, baseline_rss):
    path = tmp_path / "huge.safetensors"
    n = 16 * 2**20 + 1
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + b"{")
        f.truncate(8 + n + 8)                            # sparse: no disk and no reading needed
    rss, seconds, outcome = peak_rss_mib(path)
    assert f"at most {16 * 2**20}" in outcome and "huge.safetensors" in outcome and rss < baseline_rss + 10 and seconds < 1


def test_tensor_names_are_escaped_and_bounded_in_messages(tmp_path):
    name = "lm_head.weight\n\x1b[2Jerror: fake" + "y" * 200_000
    message = refused(safetensors_file(tmp_path, {name: entry(0, 8, dtype="F64")}, bytes(8)), read_safetensors)
    assert "\\n" in message and "\\x1b" in message


# --- index files ---------------------------------------------------------------------------------------------

def indexed_dir(tmp_path, weight_map):
    source = FIXTURES / "b7-rope-h4-l3-fp16" / "hf-safetensors"
    directory = tmp_path / "ckpt"
    directory.mkdir()
    for shard in source.glob("*.safetensors"):
        (directory / shard.name).symlink_to(shard)           # symlinked shards, as in the Hugging Face cache
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


@pytest.mark.parametrize("file", ["../../x.safetensors", "/etc/passwd", "sub/model.safetensors", "..", "",
                                  "a\\b.safetensors", "x\x00.safetensors"])
def test_an_index_may_only_name_files_of_its_directory(tmp_path, file):
    directory = indexed_dir(tmp_path, {"model.norm.weight": file})
    refused(directory / "model.safetensors.index.json", lambda _: read_checkpoint(directory),
            "not a file name in the checkpoint directory")


def test_symlinked_shards_are_read(tmp_path):
    source = FIXTURES / "b7-rope-h4-l3-fp16" / "hf-safetensors"
    weight_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = read_checkpoint(indexed_dir(tmp_path, weight_map))
    assert tensors.keys() == read_checkpoint(source).keys()


@pytest.mark.parametrize("raw,match", [(b"[" * 100_000, "nested too deeply"), (b'{"weight_map": "\xff"}', "UTF-8"),
                                       (b'{"metadata": {}}', "weight_map"), (b"[]", "JSON object")])
def test_malformed_index_files_are_refused(tmp_path, raw, match):
    directory = indexed_dir(tmp_path, {})
    (directory / "model.safetensors.index.json").write_bytes(raw)
    refused(directory / "model.safetensors.index.json", lambda _: read_checkpoint(directory), match)


def test_an_index_over_16_mib_is_refused_unread(tmp_path):
    directory = indexed_dir(tmp_path, {})
    with open(directory / "model.safetensors.index.json", "r+b") as f:
        f.truncate(16 * 2**20 + 1)                       # sparse
    refused(directory / "model.safetensors.index.json", lambda _: read_checkpoint(directory), "at most 16 MiB")
