"""Read Hugging Face checkpoints without torch: torch `.bin` zips (bcnp.torch_bin) and safetensors, both
memory-mapped, and a checkpoint directory of either.

Nothing here loads a whole file. Each reader returns `Tensor` records (bcnp.tensor) that point into a read-only
memory map of the file; values are touched only when a caller asks for them (`numpy()`, `float32()`, `float16()`),
so opening Baichuan-13B (26.5 GB of bfloat16 in 3 shards) costs a few milliseconds and no RAM.

The files may be hostile: every way one can be malformed ends in one `CheckpointError` that names the file,
in bounded time and memory, and a name from a file reaches a message only through `shown()` (escaped, cut).
A safetensors header is at most 16 MiB and must describe the data exactly, as the reference library requires.
"""
import dataclasses
import glob
import json
import math
import os
import re
import struct

import numpy as np

from .config import Config, read_config_json
from .errors import read_json_object
from .layout import expected_section_shapes
from .tensor import MAX_NDIM, NUMPY_DTYPES, CheckpointError, Tensor, _is_count, _is_shape, map_file, shown
from .torch_bin import read_torch_bin
from .torch_pow import rope_inv_freq_table


# --- safetensors --------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8", "U8": "uint8"}
# The reference `safetensors` library refuses headers over 100 MB; bcnp refuses them over 16 MiB. Parsing costs
# ~24 us and 1.4 kB per tensor, so 100 MB of header is ~1M tensors, ~24 s and 1.4 GB, while a real Baichuan-13B
# shard's header is ~30 kB; 16 MiB bounds a hostile header at ~5 s and ~330 MB and refuses nothing real.
MAX_SAFETENSORS_HEADER = 16 * 2**20


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs):
    """json's object_pairs_hook: a JSON object as a dict, refusing a key given twice (json keeps the last)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return result


def _safetensors_header(path):
    """(the JSON header as a dict, the offset where the data starts, the file's size)."""
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > file_size - 8:
                raise CheckpointError(f"{path}: not a safetensors file, truncated (header length "
                                      f"{n} for a file of {file_size} bytes)")
            if n > MAX_SAFETENSORS_HEADER:
                raise CheckpointError(f"{path}: safetensors header of {n} bytes; safetensors allows at most "
                                      f"{MAX_SAFETENSORS_HEADER}")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: safetensors header is not UTF-8 (byte {8 + e.start})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: safetensors header is nested too deeply") from None
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: safetensors header names {shown(str(e.args[0]))} twice") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: safetensors header is not JSON ({shown(str(e), 200)})") from None
    if type(header) is not dict:
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + n, file_size


def _safetensors_entry(where, entry):
    """(dtype, shape, begin, end) of one header entry, every field checked for type and range."""
    if type(entry) is not dict:
        raise CheckpointError(f"{where}: header entry is a {type(entry).__name__}, not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if type(code) is not str or code not in SAFETENSORS_DTYPES:
        code = shown(code) if type(code) is str else f"a {type(code).__name__}"
        raise CheckpointError(f"{where} has unsupported dtype {code}; bcnp reads {', '.join(SAFETENSORS_DTYPES)}")
    if not _is_shape(shape, list):
        raise CheckpointError(f"{where}: shape must be a list of at most {MAX_NDIM} counts, holding under 2**58 "
                              "elements")
    dtype = SAFETENSORS_DTYPES[code]
    nbytes = math.prod(shape) * NUMPY_DTYPES[dtype].itemsize
    if not (type(offsets) is list and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
        raise CheckpointError(f"{where}: data_offsets must be two counts below 2**62")
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(f"{where}: data_offsets {offsets} do not hold {nbytes} bytes of {dtype} {shape}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def read_safetensors(path):
    """The tensors of a `.safetensors` file, memory-mapped: 8-byte header length, JSON header, raw bytes.

    As strict as the reference library: every data byte belongs to exactly one tensor, and nothing follows."""
    path = os.fspath(path)
    header, data_start, file_size = _safetensors_header(path)
    metadata = header.pop("__metadata__", {})
    if type(metadata) is not dict or not all(type(v) is str for v in metadata.values()):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")
    file_map = map_file(path)
    tensors, spans = {}, []
    for name, entry in header.items():
        where = f"{path}: tensor {shown(name)}"
        dtype, shape, begin, end = _safetensors_entry(where, entry)
        if data_start + end > file_size:
            raise CheckpointError(f"{where}: data ends at byte {data_start + end}, beyond the file's "
                                  f"{file_size} bytes (truncated)")
        tensors[name] = Tensor(name, path, dtype, shape, file_map[data_start + begin: data_start + end])
        spans.append((begin, end, name))
    covered, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin != covered:
            problem = f"overlaps tensor {shown(previous)}" if begin < covered else \
                f"leaves bytes {covered}..{begin - 1} in no tensor"
            raise CheckpointError(f"{path}: tensor {shown(name)}: data_offsets [{begin}, {end}] {problem}")
        covered, previous = end, name
    if data_start + covered != file_size:
        raise CheckpointError(f"{path}: {file_size - data_start - covered} bytes after the last tensor's data "
                              "(trailing garbage)")
    return tensors


# --- a checkpoint directory ---------------------------------------------------------------------------------

# (index file, single file, shard pattern, reader), safetensors first: preferred when both exist.
LAYOUTS = [("model.safetensors.index.json", "model.safetensors", "model-*.safetensors", read_safetensors),
           ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model-*.bin", read_torch_bin)]


def checkpoint_files(directory):
    """The checkpoint files of a directory, their reader, and the index's weight_map (or None)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    for index_name, single_name, pattern, reader in LAYOUTS:
        index_path = os.path.join(directory, index_name)
        if os.path.exists(index_path):
            weight_map = _read_index(index_path)
            files = sorted(set(weight_map.values()))
            for file in files:
                if not os.path.isfile(os.path.join(directory, file)):
                    name = next(n for n, f in weight_map.items() if f == file)
                    raise CheckpointError(f"{os.path.join(directory, shown(file))}: missing shard (named by "
                                          f"{index_name} for tensor {shown(name)})")
            return [os.path.join(directory, f) for f in files], reader, weight_map
        if os.path.isfile(os.path.join(directory, single_name)):
            return [os.path.join(directory, single_name)], reader, None
        shards = sorted(glob.glob(os.path.join(directory, pattern)))
        if shards:
            _check_shard_numbering(shards)
            return shards, reader, None
    raise CheckpointError(f"{directory}: no checkpoint files (expected model.safetensors, model-*.safetensors, "
                          "pytorch_model.bin or pytorch_model-*.bin)")


MAX_INDEX_BYTES = 16 * 2**20    # ~100 bytes per tensor: room for 150,000 tensors


def _read_index(index_path):
    """The weight_map of an index file: tensor name -> a shard's plain file name in the same directory."""
    try:
        size = os.path.getsize(index_path)
    except OSError as e:
        raise CheckpointError(f"{index_path}: cannot read the checkpoint index ({e.strerror or e})") from None
    if size > MAX_INDEX_BYTES:
        raise CheckpointError(f"{index_path}: checkpoint index of {size} bytes; a 13B's is ~30 kB (at most "
                              f"{MAX_INDEX_BYTES // 2**20} MiB read)")
    # read_json allocates max_bytes + 1 up front: a cap of the file's own size keeps opening a model small.
    index = read_json_object(index_path, error=CheckpointError, max_bytes=max(size, 1), what="checkpoint index")
    weight_map = index.get("weight_map")
    if type(weight_map) is not dict or not weight_map:
        raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names")
    for name, file in weight_map.items():
        if type(file) is not str:
            raise CheckpointError(f"{index_path}: weight_map gives tensor {shown(name)} a {type(file).__name__}, "
                                  "not a file name")
        # A shard is a file of this directory (it may be a symlink, as in the Hugging Face cache): `../x` or
        # `/etc/passwd` would make an index read any file on the machine.
        if file in ("", ".", "..") or any(c in file for c in "/\\\0"):
            raise CheckpointError(f"{index_path}: weight_map puts tensor {shown(name)} in {shown(file)}, which is "
                                  "not a file name in the checkpoint directory")
    return weight_map


def _check_shard_numbering(shards):
    """Without an index, `model-00002-of-00003.*` still tells us which shards must exist."""
    numbered = [re.search(r"-(\d+)-of-(\d+)\.", os.path.basename(p)) for p in shards]
    if not all(numbered):
        return
    total = {int(m.group(2)) for m in numbered}
    present = {int(m.group(1)) for m in numbered}
    if len(total) == 1:
        n = total.pop()
        missing = sorted(set(range(1, n + 1)) - present)
        if missing:
            first = numbered[0]
            name = os.path.basename(shards[0])
            width = len(first.group(1))
            name = name.replace(f"-{first.group(1)}-of-", f"-{missing[0]:0{width}d}-of-")
            raise CheckpointError(f"{os.path.join(os.path.dirname(shards[0]), name)}: missing shard "
                                  f"({len(missing)} of {n} shards absent)")


def read_checkpoint(directory, expected_shapes=None, buffers=None):
    """Every tensor of a checkpoint directory (HF `.bin` / `.safetensors`, sharded or not, or a converted dir).

    `expected_shapes` maps each name to a shape tuple, or to (dtype, shape): then every expected tensor must be
    present with exactly that shape (and dtype), and no other tensor may be. The RoPE tables of Baichuan-7B
    (`...rotary_emb.inv_freq`) are buffers, not weights: left out, or put in the dict `buffers`.
    """
    files, reader, weight_map = checkpoint_files(directory)
    tensors = {}
    for path in files:
        for name, tensor in reader(path).items():
            if name.endswith("rotary_emb.inv_freq"):
                if buffers is not None:
                    buffers[name] = tensor
                continue
            if name in tensors:
                raise CheckpointError(f"{tensor.where()} is also in {tensors[name].path}")
            tensors[name] = tensor
    if weight_map is not None:
        for name, file in weight_map.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            path = os.path.join(os.fspath(directory), file)
            if name not in tensors or os.path.normpath(tensors[name].path) != os.path.normpath(path):
                raise CheckpointError(f"{shown(path, 400)}: tensor {shown(name)} is missing (the index says it is in "
                                      "this file)")
    if expected_shapes is not None:
        check_shapes(tensors, expected_shapes, directory)
    return tensors


def check_shapes(tensors, expected, directory):
    for name, tensor in tensors.items():
        if name not in expected:
            raise CheckpointError(f"{tensor.where()} is not part of the model (unexpected tensor)")
    for name, want in expected.items():
        dtype, shape = want if len(want) == 2 and isinstance(want[0], str) else (None, want)
        shape = tuple(shape)
        if name not in tensors:
            raise CheckpointError(f"{os.fspath(directory)}: tensor {name} is missing (expected shape {shape})")
        tensor = tensors[name]
        if tensor.shape != shape:
            raise CheckpointError(f"{tensor.where()} has shape {tensor.shape}, expected {shape}")
        if dtype is not None and tensor.dtype != dtype:
            raise CheckpointError(f"{tensor.where()} has dtype {tensor.dtype}, expected {dtype}")


def read_model_dir(directory, family=None):
    """(config, bcnp section of config.json or None, tensors) of a Hugging Face directory or one written by
    `bcnp.convert`, every tensor's name and shape checked against the config (`family` overrides its family).
    A checkpoint's own RoPE table, when it has one, becomes the config's `rope_inv_freq`."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such model directory")
    config = Config.from_json(directory, family=family)
    section = read_config_json(directory).get("bcnp")
    if section is None:
        expected = config.weight_shapes()
    else:
        expected = expected_section_shapes(config, section, os.path.join(directory, "config.json"))
    buffers = {}
    tensors = read_checkpoint(directory, expected, buffers)
    table = rope_table(config, buffers)
    if table is not None:
        config = dataclasses.replace(config, rope_inv_freq=table)
    return config, section, {name: tensors[name] for name in expected}      # in the model's order


def rope_table(config, buffers):
    """The RoPE inverse frequencies the checkpoint stores (Baichuan-7B: one per layer, all equal), as a tuple of
    float32 values, or None. The original rotates with this table, and its float32 `pow` is not correctly
    rounded: at Baichuan-7B's widths 9 of the 64 values differ by 1-2 ulp from a correctly rounded table, which
    moves the logits by 7e-5 (scaled) at 2048 positions. Checked against the config: same length, same values
    to 1e-5 (a table of another theta or head_dim is an error, not a rounding)."""
    if not buffers or config.position_embedding != "rope":
        return None
    want = np.asarray(rope_inv_freq_table(config.rope_theta, config.head_dim), dtype=np.float32)
    table = None
    for name, tensor in buffers.items():
        if tensor.shape != want.shape:
            raise CheckpointError(f"{tensor.where()} has shape {tensor.shape}, expected {want.shape} "
                                  "(head_dim / 2 RoPE frequencies)")
        values = tensor.float32()
        if not np.allclose(values, want, rtol=1e-5, atol=0):
            raise CheckpointError(f"{tensor.where()} is not the RoPE table of rope_theta {config.rope_theta:g} and "
                                  f"head_dim {config.head_dim} (differs by up to "
                                  f"{float(np.abs(values / want - 1).max()):.3g} relative)")
        if table is not None and not np.array_equal(values, table):
            raise CheckpointError(f"{tensor.where()} differs from the RoPE table of the other layers")
        table = values
    return tuple(float(v) for v in table)
