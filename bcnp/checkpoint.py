"""Read Hugging Face checkpoints without torch: torch `.bin` zips and safetensors, both memory-mapped.

Nothing here loads a whole file. Each reader returns `Tensor` records that point into a read-only memory map of
the file; values are touched only when a caller asks for them (`numpy()`, `float32()`, `float16()`), so opening
Baichuan-13B (26.5 GB of bfloat16 in 3 shards) costs a few milliseconds and no RAM.

A `.bin` is a ZIP of raw storages plus a pickled description (`data.pkl`). Unpickling is the dangerous part:
a pickle can name any global and call it. `_StateDictUnpickler` knows only the few torch names a state dict
uses and rebuilds them as our own records, so no pickle code ever runs. See FORMATS.md for the byte facts.
"""
import collections
import glob
import io
import json
import mmap
import os
import pickle
import re
import struct
import zipfile

import numpy as np


class CheckpointError(ValueError):
    pass


# Our dtype names, the NumPy dtype their bytes are read as (bfloat16 as its raw bits), and the element size.
NUMPY_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"),
                "int8": np.dtype("i1"), "uint8": np.dtype("u1")}
FLOAT16_MAX = 65504.0


class Tensor:
    """A tensor in a checkpoint file, not yet read.

    `buffer` is a 1-D uint8 memory map of the bytes of the tensor's storage; `offset` and `strides` count
    elements, as torch does (safetensors tensors are contiguous: strides None).
    """

    def __init__(self, name, path, dtype, shape, buffer, offset=0, strides=None):
        self.name, self.path, self.dtype, self.shape = name, path, dtype, tuple(int(s) for s in shape)
        self.buffer, self.offset, self.strides = buffer, int(offset), strides
        self.numel = int(np.prod(self.shape, dtype=np.int64))
        self.nbytes = self.numel * NUMPY_DTYPES[dtype].itemsize if dtype in NUMPY_DTYPES else 0

    def __repr__(self):
        return f"Tensor({self.name!r}, {self.dtype}, {self.shape}, {os.path.basename(self.path)})"

    def where(self):
        return f"{self.path}: tensor {self.name}"

    def numpy(self):
        """The stored values (bfloat16 as np.uint16 bits): a read-only view of the memory map, no copy."""
        dt = NUMPY_DTYPES[self.dtype]
        storage = self.buffer[: len(self.buffer) // dt.itemsize * dt.itemsize].view(dt)
        if self.strides is None:
            return storage[self.offset: self.offset + self.numel].reshape(self.shape)
        # A torch view (transpose, slice) of a larger storage: stride through it in place.
        byte_strides = tuple(s * dt.itemsize for s in self.strides)
        return np.lib.stride_tricks.as_strided(storage[self.offset:], self.shape, byte_strides, writeable=False)

    def stored(self, rows=None):
        """The stored values of `rows` (a slice of the first axis; all by default), bfloat16 as np.uint16 bits,
        refusing NaN and infinity: a weight that is not finite is a broken checkpoint, not a model."""
        values = self.numpy()
        if rows is not None:
            values = values[rows]
        bad = nonfinite(values, self.dtype)
        if bad is not None:
            if isinstance(rows, slice) and bad:
                bad = (bad[0] + (rows.start or 0),) + bad[1:]       # the index in the whole tensor
            raise CheckpointError(f"{self.where()} holds a non-finite value at index {bad}")
        return values

    def float32(self, rows=None):
        """The values as a new float32 array; `rows` (a slice of the first axis) reads only those rows."""
        return to_float32(self.stored(rows), self.dtype)

    def float16(self, rows=None):
        """The values as float16, refusing values float16 cannot hold (bfloat16 has float32's range).

        A float16 tensor is returned as its memory-mapped view; others are converted into a new array.
        """
        values = self.stored(rows)
        if self.dtype == "float16":
            return values
        x = to_float32(values, self.dtype)
        with np.errstate(over="ignore"):
            out = x.astype(np.float16)
        if np.isinf(out).any():  # magnitudes from 65520 up round to inf; 65504 is float16's largest
            big = float(np.abs(x).max())
            raise CheckpointError(f"{self.where()} holds {big:g}, beyond float16's range (max {FLOAT16_MAX:g})")
        return out

    def release(self):
        """Drop this tensor's pages from the process's resident memory once it has been used.

        They stay in the OS page cache and are mapped again if read again. Without this, streaming through a
        26.5 GB checkpoint would leave every page it touched counted as ours.
        """
        mapping = getattr(self.buffer, "_mmap", None)
        if mapping is None or not hasattr(mapping, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = self.buffer.ctypes.data - np.frombuffer(mapping, np.uint8).ctypes.data
        end = start + self.buffer.nbytes
        start -= start % mmap.PAGESIZE
        mapping.madvise(mmap.MADV_DONTNEED, start, end - start)


# The exponent bits of each float format: all ones means infinity or NaN.
EXPONENT_MASKS = {"float32": (np.uint32, 0x7F800000), "float16": (np.uint16, 0x7C00), "bfloat16": (np.uint16, 0x7F80)}


def nonfinite(values, dtype):
    """The index (a tuple) of the first NaN or infinity in stored `values` of `dtype`, or None (integers: None)."""
    if dtype not in EXPONENT_MASKS:
        return None
    bits, mask = EXPONENT_MASKS[dtype]
    exponent = np.bitwise_and(values.view(bits), bits(mask))
    if not (exponent == mask).any():
        return None
    return tuple(int(i) for i in np.argwhere(exponent == mask)[0])


def to_float32(values, dtype):
    """Stored values (as `Tensor.numpy()` returns them) to a new float32 array."""
    if dtype != "bfloat16":
        return np.array(values, dtype=np.float32)
    try:
        from bcnp._dtypes import bf16_to_f32
    except ImportError:         # not built (bcnp.quant warned once): bfloat16 is the top half of a float32
        return (np.asarray(values).astype(np.uint32) << np.uint32(16)).view(np.float32)
    src = np.ascontiguousarray(values).reshape(-1)
    dst = np.empty(src.shape, np.float32)
    bf16_to_f32(src, dst)
    return dst.reshape(values.shape)


def map_file(path):
    """The whole file as a read-only uint8 memory map (an empty file cannot be mapped)."""
    if os.path.getsize(path) == 0:
        return np.zeros(0, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


# --- torch .bin ---------------------------------------------------------------------------------------------

# Storage classes by name; only the first five can be read (Baichuan uses BFloat16 and Half).
TORCH_STORAGES = {"FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
                  "CharStorage": "int8", "ByteStorage": "uint8",
                  "DoubleStorage": "float64", "LongStorage": "int64", "IntStorage": "int32",
                  "ShortStorage": "int16", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
                  "ComplexDoubleStorage": "complex128", "QInt8Storage": "qint8", "QUInt8Storage": "quint8",
                  "QInt32Storage": "qint32", "UntypedStorage": "untyped"}


class _StorageType:
    """Stands in for a torch.*Storage class: only ever compared, never called."""

    def __init__(self, name):
        self.name, self.dtype = name, TORCH_STORAGES[name]


class _TensorType:
    """Stands in for torch.Tensor / torch.nn.Parameter as the `new_type` of _rebuild_from_type_v2."""

    def __init__(self, name):
        self.name = name


class _Storage:
    def __init__(self, storage_type, key, numel):
        self.type, self.key, self.numel = storage_type, key, numel


class _TensorRecord:
    """What _rebuild_tensor_v2 returns here: where a tensor's values are, to be mapped once the name is known."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, _Storage):
        raise CheckpointError("_rebuild_tensor_v2 without a storage")
    return _TensorRecord(storage, int(storage_offset), tuple(int(n) for n in size), tuple(int(n) for n in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_parameter) or not isinstance(new_type, _TensorType) or state:
        raise CheckpointError("torch._tensor._rebuild_from_type_v2 with anything but a plain tensor")
    return func(*args)


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorType("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorType("torch.nn.parameter.Parameter"),
    **{("torch", name): _StorageType(name) for name in TORCH_STORAGES},
}


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict and nothing else: every global outside the allow-list is refused."""

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            raise CheckpointError(f"{self.path}: holds a nested torch archive (torch.storage._load_from_bytes), "
                                  "which bcnp does not read; re-save it with torch.save or as safetensors")
        raise CheckpointError(f"{self.path}: data.pkl refers to the global {module}.{name}, which a state dict "
                              "never needs; refusing to load it (only torch tensor rebuild functions are allowed)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self.path}: data.pkl has an unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        return _Storage(storage_type, str(key), int(numel))


def _member_data_offset(f, info, path):
    """Where a stored ZIP member's bytes start: after its *local* header, whose extra field torch pads."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: corrupt zip (bad local header for {info.filename})")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_torch_bin(path):
    """The tensors of a torch `.bin` (what torch.save writes), memory-mapped in place."""
    path = os.fspath(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise CheckpointError(f"{path}: no such file") from None
        raise CheckpointError(f"{path}: not a torch zip checkpoint, truncated or corrupt ({e})") from None
    with archive:
        members = {info.filename: info for info in archive.infolist()}
        pkl = [n for n in members if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: no data.pkl in the zip (not a torch.save checkpoint)")
        prefix = pkl[0][: -len("data.pkl")]
        if prefix + "byteorder" in members:
            order = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if order != "little":
                raise CheckpointError(f"{path}: byteorder {order!r}; bcnp reads little-endian checkpoints only")
        try:
            data_pkl = archive.read(pkl[0])
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{path}: cannot read {pkl[0]} ({e})") from None
        state = _unpickle_state_dict(data_pkl, path)
        file_size = os.path.getsize(path)
        file_map = map_file(path)
        storages = {}  # key -> uint8 map of its bytes
        tensors = {}
        with open(path, "rb") as f:
            for name, record in state.items():
                storage, offset, size, stride = record.storage, record.offset, record.size, record.stride
                where = f"{path}: tensor {name}"
                dtype = storage.type.dtype
                if dtype not in NUMPY_DTYPES:
                    raise CheckpointError(f"{where} has unsupported dtype {dtype} (torch.{storage.type.name}); "
                                          f"bcnp reads {', '.join(NUMPY_DTYPES)}")
                if storage.key not in storages:
                    info = members.get(f"{prefix}data/{storage.key}")
                    if info is None:
                        raise CheckpointError(f"{where}: storage data/{storage.key} is missing from the zip")
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise CheckpointError(f"{where}: storage data/{storage.key} is compressed; torch.save "
                                              "stores storages uncompressed")
                    start = _member_data_offset(f, info, path)
                    if start + info.file_size > file_size:
                        raise CheckpointError(f"{where}: storage data/{storage.key} ends at byte "
                                              f"{start + info.file_size}, beyond the file's {file_size} bytes "
                                              "(truncated)")
                    storages[storage.key] = file_map[start: start + info.file_size]
                buffer = storages[storage.key]
                itemsize = NUMPY_DTYPES[dtype].itemsize
                if storage.numel * itemsize > len(buffer):
                    raise CheckpointError(f"{where}: storage data/{storage.key} should hold {storage.numel} "
                                          f"{dtype} values but has {len(buffer)} bytes (truncated)")
                _check_view(where, size, stride, offset, storage.numel)
                strides = None if _is_contiguous(size, stride) else stride
                tensors[name] = Tensor(name, path, dtype, size, buffer, offset, strides)
    return tensors


def _unpickle_state_dict(data, path):
    try:
        state = _StateDictUnpickler(io.BytesIO(data), path).load()
    except CheckpointError:
        raise
    except Exception as e:  # a malformed pickle can fail in many ways; all mean the same to the user
        raise CheckpointError(f"{path}: corrupt data.pkl ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: data.pkl holds a {type(state).__name__}, not a state dict")
    for name, value in state.items():
        if not (isinstance(name, str) and isinstance(value, _TensorRecord)):
            raise CheckpointError(f"{path}: entry {name!r:.80} of the state dict is not a tensor")
    return state


def _is_contiguous(size, stride):
    expected = 1
    for n, s in zip(reversed(size), reversed(stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _check_view(where, size, stride, offset, numel):
    if len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride) or offset < 0:
        raise CheckpointError(f"{where}: invalid size {size} / stride {stride} / offset {offset}")
    if 0 in size:
        return
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= numel:
        raise CheckpointError(f"{where}: size {size}, stride {stride}, offset {offset} reach element {last} "
                              f"of a storage of {numel}")


# --- safetensors --------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8", "U8": "uint8"}


def read_safetensors(path):
    """The tensors of a `.safetensors` file, memory-mapped: 8-byte header length, JSON header, raw bytes."""
    path = os.fspath(path)
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
            if n is None or n > file_size - 8:
                raise CheckpointError(f"{path}: not a safetensors file, truncated (header length "
                                      f"{n} for a file of {file_size} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + n
    file_map = map_file(path)
    tensors = {}
    for name, entry in header.items():
        where = f"{path}: tensor {name}"
        try:
            dtype_code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{where}: corrupt header entry {entry!r:.80}") from None
        if dtype_code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where} has unsupported dtype {dtype_code}; bcnp reads "
                                  f"{', '.join(SAFETENSORS_DTYPES)}")
        dtype = SAFETENSORS_DTYPES[dtype_code]
        if not all(isinstance(s, int) and s >= 0 for s in shape):
            raise CheckpointError(f"{where}: invalid shape {list(shape)}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * NUMPY_DTYPES[dtype].itemsize
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end and end - begin == nbytes):
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] do not hold {nbytes} bytes of "
                                  f"{dtype} {list(shape)}")
        if data_start + end > file_size:
            raise CheckpointError(f"{where}: data ends at byte {data_start + end}, beyond the file's "
                                  f"{file_size} bytes (truncated)")
        tensors[name] = Tensor(name, path, dtype, shape, file_map[data_start + begin: data_start + end])
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
                    raise CheckpointError(f"{os.path.join(directory, file)}: missing shard (named by {index_name} "
                                          f"for tensor {name})")
            return [os.path.join(directory, f) for f in files], reader, weight_map
        if os.path.isfile(os.path.join(directory, single_name)):
            return [os.path.join(directory, single_name)], reader, None
        shards = sorted(glob.glob(os.path.join(directory, pattern)))
        if shards:
            _check_shard_numbering(shards)
            return shards, reader, None
    raise CheckpointError(f"{directory}: no checkpoint files (expected model.safetensors, model-*.safetensors, "
                          "pytorch_model.bin or pytorch_model-*.bin)")


def _read_index(index_path):
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a checkpoint index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: weight_map must map tensor names to file names")
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


def read_checkpoint(directory, expected_shapes=None):
    """Every tensor of a checkpoint directory (HF `.bin` / `.safetensors`, sharded or not, or a converted dir).

    `expected_shapes` maps each name to a shape tuple, or to (dtype, shape): then every expected tensor must be
    present with exactly that shape (and dtype), and no other tensor may be.
    """
    files, reader, weight_map = checkpoint_files(directory)
    tensors = {}
    for path in files:
        for name, tensor in reader(path).items():
            if name.endswith("rotary_emb.inv_freq"):  # a buffer RoPE recomputes; not a weight
                continue
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name} is also in {tensors[name].path}")
            tensors[name] = tensor
    if weight_map is not None:
        for name, file in weight_map.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            path = os.path.join(os.fspath(directory), file)
            if name not in tensors or os.path.normpath(tensors[name].path) != os.path.normpath(path):
                raise CheckpointError(f"{path}: tensor {name} is missing (the index says it is in this file)")
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


def read_model_dir(directory):
    """(config, bcnp section of config.json or None, tensors) of a Hugging Face directory or one written by
    `bcnp.convert`, every tensor's name and shape checked against the config."""
    from .config import Config, read_config_json
    from .layout import expected_section_shapes
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such model directory")
    config = Config.from_json(directory)
    section = read_config_json(directory).get("bcnp")
    if section is None:
        expected = config.weight_shapes()
    else:
        expected = expected_section_shapes(config, section, os.path.join(directory, "config.json"))
    tensors = read_checkpoint(directory, expected)
    return config, section, {name: tensors[name] for name in expected}      # in the model's order
