"""Read Hugging Face checkpoints without torch: torch `.bin` zips and safetensors, both memory-mapped.

Nothing here loads a whole file. Each reader returns `Tensor` records that point into a read-only memory map of
the file; values are touched only when a caller asks for them (`numpy()`, `float32()`, `float16()`), so opening
Baichuan-13B (26.5 GB of bfloat16 in 3 shards) costs a few milliseconds and no RAM.

The files may be hostile: every way one can be malformed ends in one `CheckpointError` that names the file,
in bounded time and memory, and a name from a file reaches a message only through `shown()` (escaped, cut).
- A `.bin` is a ZIP of raw storages plus a pickled description (`data.pkl`). Every member's local header is
  checked against the zip directory and no two members may overlap; the small members are read within a size
  cap, their CRC verified. `data.pkl` is run by `_StateDictPickle`, an interpreter of the ~30 opcodes a state
  dict uses, which knows only the few torch names a state dict needs and builds our own records: no pickle code
  ever runs, and nothing can alter a record once built.
- A safetensors header is at most 100 MB and must describe the data exactly, as the reference library requires.
"""
import collections
import dataclasses
import glob
import json
import math
import mmap
import os
import pickle
import pickletools
import re
import struct
import zipfile
import zlib

import numpy as np

from .config import Config, read_config_json
from .errors import read_json_object
from .layout import expected_section_shapes
from .torch_pow import rope_inv_freq_table


class CheckpointError(ValueError):
    pass


def shown(text, limit=120):
    """A name from a file, fit for an error message: as is when short and printable, else its repr, cut."""
    if len(text) <= limit and text.isprintable():
        return text
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


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
        self.numel = math.prod(self.shape)
        self.nbytes = self.numel * NUMPY_DTYPES[dtype].itemsize if dtype in NUMPY_DTYPES else 0

    def __repr__(self):
        return f"Tensor({shown(self.name)!r}, {self.dtype}, {self.shape}, {os.path.basename(self.path)})"

    def where(self):
        return f"{self.path}: tensor {shown(self.name)}"

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


# --- torch .bin: the zip ----------------------------------------------------------------------------------------

MAX_PICKLE_BYTES = 64 * 2**20   # data.pkl of a Baichuan-13B shard is ~50 kB (~350 bytes per tensor)
MAX_RECORD_BYTES = 4096         # the other small members: byteorder ("little"), version ("3\n"), serialization_id
UNSUPPORTED_FLAGS = 0x1 | 0x20 | 0x40   # encrypted, patch data, strong encryption: torch.save writes none of them
LOCAL_HEADER = struct.Struct("<4s2xHH4xIIIHH")   # signature, flags, method, CRC, sizes, name and extra lengths
# What zipfile raises on a corrupt archive is not specified; these are the types a fuzz campaign met.
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error,
              NotImplementedError, RuntimeError, OverflowError, IndexError, zlib.error)


def _reason(error):
    return shown(f"{type(error).__name__}: {error}", 200)


def _open_zip(path):
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except ZIP_ERRORS as e:
        raise CheckpointError(f"{path}: not a torch zip checkpoint, truncated or corrupt ({_reason(e)})") from None


def _torch_members(archive, path):
    """({name: ZipInfo}, the records' prefix `<stem>/`) of a torch.save zip, refusing what torch never writes."""
    members = {}
    for info in archive.infolist():
        where = f"{path}: zip member {shown(info.filename)}"
        if info.filename in members:
            raise CheckpointError(f"{where} appears twice (corrupt zip)")
        if info.flag_bits & UNSUPPORTED_FLAGS:
            raise CheckpointError(f"{where} is encrypted or patched (flags {info.flag_bits:#06x}); torch.save "
                                  "writes plain members")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CheckpointError(f"{where} uses compression method {info.compress_type}; torch.save stores "
                                  "members uncompressed")
        members[info.filename] = info
    pickles = [name for name in members if name == "data.pkl" or name.endswith("/data.pkl")]
    if not pickles:
        raise CheckpointError(f"{path}: no data.pkl in the zip (not a torch.save checkpoint)")
    if len(pickles) > 1:
        raise CheckpointError(f"{path}: the zip holds {len(pickles)} data.pkl records ({shown(pickles[0])}, "
                              f"{shown(pickles[1])}, ...); a torch.save file has one")
    return members, pickles[0][: -len("data.pkl")]


def _member_spans(archive, members, path):
    """{name: (start, end)} of every member's bytes in the file, each local header checked against the zip
    directory, and no two members overlapping (else a forged directory could alias one storage as another)."""
    spans = {}
    with open(path, "rb") as f:
        for name, info in members.items():
            try:
                span = _member_span(f, info, archive.start_dir)
            except (OSError, ValueError):                   # a seek before the file, a name that is not UTF-8
                span = None
            if span is None:
                raise CheckpointError(f"{path}: zip member {shown(name)}: its local header, CRC or size disagrees "
                                      "with the zip directory (corrupt)")
            spans[name] = span
    ordered = sorted(members.values(), key=lambda info: info.header_offset)
    for before, after in zip(ordered, ordered[1:]):
        if after.header_offset < spans[before.filename][1]:
            raise CheckpointError(f"{path}: zip members {shown(before.filename)} and {shown(after.filename)} "
                                  "overlap (corrupt)")
    return spans


def _member_span(f, info, directory_start):
    """(start, end) of a member's bytes, or None if its local header or data descriptor contradicts `info`.

    Torch pads the local extra field (storages start 64-aligned), so the start is read from the local header;
    the CRC and sizes are then found after the data (torch sets flag bit 3 and writes a data descriptor), which
    checks that start without reading the storage in between."""
    f.seek(info.header_offset)
    raw = f.read(LOCAL_HEADER.size)
    if len(raw) != LOCAL_HEADER.size:
        return None
    signature, flags, method, crc, compressed, size, name_length, extra_length = LOCAL_HEADER.unpack(raw)
    name = f.read(name_length).decode("utf-8" if flags & 0x800 else "cp437")
    if signature != b"PK\x03\x04" or method != info.compress_type or name != info.orig_filename:
        return None
    start = info.header_offset + LOCAL_HEADER.size + name_length + extra_length
    end = start + info.compress_size
    if end > directory_start:
        return None
    if flags & 0x08:
        f.seek(end)
        record = f.read(24)
        record = record[4:] if record[:4] == b"PK\x07\x08" else record       # the signature is optional
        sizes = (info.compress_size, info.file_size)
        matches = record[:4] == struct.pack("<I", info.CRC) and (
            record[4:20] == struct.pack("<QQ", *sizes)                         # zip64
            or max(sizes) < 2**32 and record[4:12] == struct.pack("<II", *sizes))
    else:
        matches = crc == info.CRC and compressed in (info.compress_size, 0xFFFFFFFF) and size in (
            info.file_size, 0xFFFFFFFF)
    return (start, end) if matches else None


def _read_record(archive, info, limit, path):
    """A small member's bytes, never more than `limit` whatever its header says, its CRC checked by zipfile."""
    where = f"{path}: zip member {shown(info.filename)}"
    if info.file_size > limit:
        raise CheckpointError(f"{where} is {info.file_size} bytes; torch.save writes at most {limit} there")
    try:
        with archive.open(info) as f:
            data = f.read(info.file_size + 1)          # inflating no more than it claims, even if it lies
    except ZIP_ERRORS as e:
        raise CheckpointError(f"{where} cannot be read ({_reason(e)})") from None
    if len(data) != info.file_size:
        raise CheckpointError(f"{where} holds {len(data)} bytes, not the {info.file_size} its header says")
    return data


def read_torch_bin(path):
    """The tensors of a torch `.bin` (what torch.save writes), memory-mapped in place.

    Verified at open: the zip directory against every local header and data descriptor, the CRC of every
    member except the storages (data.pkl, byteorder, version, ...), and the state dict. Storages are mapped,
    not CRC-checked (that would read 26.5 GB to open the 13B): changed bytes inside one load as other values."""
    path = os.fspath(path)
    with _open_zip(path) as archive:
        members, prefix = _torch_members(archive, path)
        spans = _member_spans(archive, members, path)
        records = {name: _read_record(archive, info, MAX_PICKLE_BYTES if name == prefix + "data.pkl"
                                      else MAX_RECORD_BYTES, path)
                   for name, info in members.items() if not name.startswith(prefix + "data/")}
    order = records.get(prefix + "byteorder", b"little").strip()
    if order != b"little":
        raise CheckpointError(f"{path}: byteorder {shown(order.decode('latin-1'))}; bcnp reads little-endian "
                              "checkpoints only")
    state = _unpickle_state_dict(records[prefix + "data.pkl"], path)
    file_map = map_file(path)
    storages = {}  # key -> uint8 map of its bytes
    tensors = {}
    for name, (storage, offset, size, stride) in state.items():
        where = f"{path}: tensor {shown(name)}"
        dtype = storage.type.dtype
        if dtype not in NUMPY_DTYPES:
            raise CheckpointError(f"{where} has unsupported dtype {dtype} (torch.{storage.type.name}); "
                                  f"bcnp reads {', '.join(NUMPY_DTYPES)}")
        member = f"{prefix}data/{storage.key}"
        if member not in members:
            raise CheckpointError(f"{where}: storage data/{shown(storage.key)} is missing from the zip")
        info = members[member]
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointError(f"{where}: storage data/{shown(storage.key)} is compressed; torch.save stores "
                                  "storages uncompressed")
        if member not in storages:
            start, end = spans[member]
            storages[member] = file_map[start:end]
        buffer = storages[member]
        if storage.numel * NUMPY_DTYPES[dtype].itemsize > len(buffer):
            raise CheckpointError(f"{where}: storage data/{shown(storage.key)} should hold {storage.numel} "
                                  f"{dtype} values but has {len(buffer)} bytes (truncated)")
        _check_view(where, size, stride, offset, storage.numel)
        strides = None if _is_contiguous(size, stride) else stride
        tensors[name] = Tensor(name, path, dtype, size, buffer, offset, strides)
    return tensors


def _is_contiguous(size, stride):
    expected = 1
    for n, s in zip(reversed(size), reversed(stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _check_view(where, size, stride, offset, numel):
    if 0 in size:
        return
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= numel:
        raise CheckpointError(f"{where}: size {size}, stride {stride}, offset {offset} reach element {last} "
                              f"of a storage of {numel}")


# --- torch .bin: data.pkl, a state dict read without pickle ------------------------------------------------------

MAX_PICKLE_OPS = 2**19   # ~15,000 tensors at ~35 opcodes each (Baichuan-13B: ~100 per shard); ~40 MB at most
MAX_MARKS = 100          # torch nests 3 deep (state dict, rebuild arguments, storage id)
MAX_COUNT = 2**62        # sizes, strides, offsets and element counts are below this (int64 must hold products)
MAX_NDIM = 32            # numpy's limit
MAX_ELEMENTS = 2**58     # numpy refuses a shape whose nonzero sizes times the item size reach 2**63, zeros or not

# Storage classes by name; only the first five can be read (Baichuan uses BFloat16 and Half).
TORCH_STORAGES = {"FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
                  "CharStorage": "int8", "ByteStorage": "uint8",
                  "DoubleStorage": "float64", "LongStorage": "int64", "IntStorage": "int32",
                  "ShortStorage": "int16", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
                  "ComplexDoubleStorage": "complex128", "QInt8Storage": "qint8", "QUInt8Storage": "quint8",
                  "QInt32Storage": "qint32", "UntypedStorage": "untyped"}


class _Global:
    """Stands in for a torch class a state dict names (a storage class, torch.Tensor, Parameter): only ever
    compared, never called."""

    def __init__(self, name, dtype=None):
        self.name, self.dtype = name, dtype


# Immutable records: nothing in the pickle can change one after it was built.
_Storage = collections.namedtuple("_Storage", "type key numel")
_TensorRecord = collections.namedtuple("_TensorRecord", "storage offset size stride")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _TensorRecord(storage, storage_offset, size, stride)     # checked once the pickle is read


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func is not _rebuild_tensor_v2 or not isinstance(new_type, _Global) or type(args) is not tuple or state:
        raise _Malformed("calls torch._tensor._rebuild_from_type_v2 with anything but a plain tensor")
    return func(*args)


_ORDERED_DICT = _Global("collections.OrderedDict")
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _ORDERED_DICT,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _Global("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _Global("torch.nn.parameter.Parameter"),
    **{("torch", name): _Global(f"torch.{name}", dtype) for name, dtype in TORCH_STORAGES.items()},
}
_FUNCTIONS = (_rebuild_tensor_v2, _rebuild_parameter, _rebuild_from_type_v2)
_DICTS = (dict, collections.OrderedDict)
_OPCODE_NAMES = {op.code.encode("latin-1"): op.name for op in pickletools.opcodes}


class _Malformed(Exception):
    """data.pkl is not a state dict; the caller adds the file name and the byte position."""


def _what(value):
    """A value from the pickle named for a message: never its repr (a tuple nested 100,000 deep has none)."""
    if isinstance(value, _Global):
        return value.name
    if any(value is f for f in _FUNCTIONS):
        return value.__name__
    return type(value).__name__


def _is_count(n):
    return type(n) is int and 0 <= n < MAX_COUNT


def _is_shape(shape, kind=tuple):
    return type(shape) is kind and len(shape) <= MAX_NDIM and all(_is_count(n) for n in shape) and \
        math.prod(n for n in shape if n) < MAX_ELEMENTS


class _StateDictPickle:
    """Runs the pickle opcodes a torch state dict is made of (protocol 2 as torch writes it; 4 and 5 framing too),
    building our own records; every other opcode and every other global is refused by name.

    Not pickle.Unpickler: CPython's allocates its memo up front (a LONG_BINPUT index of 2**26 in a 10-byte pickle
    took 1 GB), lets BUILD set attributes on any object, our records included, and raises errors that lose the
    file name. Here the memo is a dict, BUILD is accepted on a dict only (state_dict()'s `_metadata`, dropped),
    dict keys must be strings (so nothing hostile is hashed), and every failure is a `_Malformed`.
    """

    def __init__(self, data):
        self.data, self.pos = bytes(data), 0
        self.stack, self.marks, self.memo = [], [], {}

    def load(self):
        for _ in range(MAX_PICKLE_OPS):
            code = self.take(1)
            if code == pickle.STOP:
                if len(self.stack) != 1 or self.marks:
                    raise _Malformed(f"stops with {len(self.stack)} objects on its stack, not one")
                return self.stack[0]
            if code not in self.OPS:
                raise _Malformed(f"uses the pickle opcode {_OPCODE_NAMES.get(code, code.hex())}, which a state "
                                 "dict never needs")
            self.OPS[code](self)
        raise _Malformed(f"has over {MAX_PICKLE_OPS} opcodes, far more than a state dict")

    def take(self, n):
        if n > len(self.data) - self.pos:
            raise _Malformed("ends in the middle of an opcode (truncated)")
        self.pos += n
        return self.data[self.pos - n: self.pos]

    def uint(self, n):
        return int.from_bytes(self.take(n), "little")

    def long1(self):
        n = self.uint(1)
        if n > 8:
            raise _Malformed(f"holds a {n}-byte integer; the counts of a state dict fit in 8")
        self.push(int.from_bytes(self.take(n), "little", signed=True))

    def text(self, n):
        try:
            return str(self.take(n), "utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise _Malformed("holds a string that is not UTF-8") from None

    def line(self):
        end = self.data.find(b"\n", self.pos, self.pos + 256)
        if end < 0:
            raise _Malformed("has a GLOBAL name without its newline")
        text = self.text(end - self.pos)
        self.pos += 1
        return text

    def push(self, value):
        self.stack.append(value)

    def pop(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _Malformed("takes more objects than its stack holds")
        return self.stack.pop()

    def pop_n(self, n):
        return list(reversed([self.pop() for _ in range(n)]))

    def pop_mark(self):
        if not self.marks:
            raise _Malformed("ends a group it never began (no MARK)")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def top(self):
        value = self.pop()
        self.push(value)
        return value

    def proto(self):
        if not 2 <= self.uint(1) <= 5:
            raise _Malformed("is not pickle protocol 2 to 5")

    def mark(self):
        if len(self.marks) >= MAX_MARKS:
            raise _Malformed(f"nests over {MAX_MARKS} deep")
        self.marks.append(len(self.stack))

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            raise _Malformed("holds a nested torch archive (torch.storage._load_from_bytes), which bcnp does not "
                             "read; re-save it with torch.save or as safetensors")
        raise _Malformed(f"refers to the global {shown(module)}.{shown(name)}, which a state dict never needs; "
                         "refusing to load it (only torch tensor rebuild functions are allowed)")

    def stack_global(self):
        name, module = self.pop(), self.pop()
        if type(module) is not str or type(name) is not str:
            raise _Malformed("names a global by something other than strings")
        self.push(self.find_class(module, name))

    def memo_get(self, index):
        if index not in self.memo:
            raise _Malformed(f"reads memo slot {index}, which it never wrote")
        self.push(self.memo[index])

    def persistent_load(self):
        pid = self.pop()
        if not (type(pid) is tuple and len(pid) == 5 and type(pid[0]) is str and pid[0] == "storage"
                and isinstance(pid[1], _Global) and pid[1].dtype is not None
                and type(pid[2]) is str and _is_count(pid[4])):
            raise _Malformed("has a persistent id that is not a torch storage")
        self.push(_Storage(pid[1], pid[2], pid[4]))

    def reduce(self):
        args, func = self.pop(), self.pop()
        if type(args) is not tuple:
            raise _Malformed(f"calls {_what(func)} with a {_what(args)} for arguments")
        if func is _ORDERED_DICT and not args:
            return self.push(collections.OrderedDict())
        if not any(func is f for f in _FUNCTIONS):
            raise _Malformed(f"calls {_what(func)}, which a state dict never calls")
        try:
            self.push(func(*args))
        except TypeError:
            raise _Malformed(f"calls {func.__name__} with {len(args)} arguments") from None

    def build(self):
        state, target = self.pop(), self.top()
        if type(target) not in _DICTS or type(state) is not dict:
            raise _Malformed(f"sets attributes of a {_what(target)}; a state dict sets only its own _metadata")

    def set_items(self, items):
        target = self.top()
        if type(target) not in _DICTS or len(items) % 2:
            raise _Malformed(f"sets items of a {_what(target)}, or an odd number of them")
        for key, value in zip(items[::2], items[1::2]):
            if type(key) is not str:
                raise _Malformed(f"uses a {_what(key)} as a key; the keys of a state dict are tensor names")
            if key in target:
                raise _Malformed(f"holds the key {shown(key)} twice")
            target[key] = value

    OPS = {
        pickle.PROTO: proto,
        pickle.FRAME: lambda self: self.take(8),            # protocol 4 framing: a length we need not know
        pickle.MARK: mark,
        pickle.EMPTY_DICT: lambda self: self.push({}),
        pickle.EMPTY_TUPLE: lambda self: self.push(()),
        pickle.TUPLE: lambda self: self.push(tuple(self.pop_mark())),
        pickle.TUPLE1: lambda self: self.push(tuple(self.pop_n(1))),
        pickle.TUPLE2: lambda self: self.push(tuple(self.pop_n(2))),
        pickle.TUPLE3: lambda self: self.push(tuple(self.pop_n(3))),
        pickle.NONE: lambda self: self.push(None),
        pickle.NEWTRUE: lambda self: self.push(True),
        pickle.NEWFALSE: lambda self: self.push(False),
        pickle.BININT: lambda self: self.push(int.from_bytes(self.take(4), "little", signed=True)),
        pickle.BININT1: lambda self: self.push(self.uint(1)),
        pickle.BININT2: lambda self: self.push(self.uint(2)),
        pickle.LONG1: long1,
        pickle.BINUNICODE: lambda self: self.push(self.text(self.uint(4))),
        pickle.SHORT_BINUNICODE: lambda self: self.push(self.text(self.uint(1))),
        pickle.BINUNICODE8: lambda self: self.push(self.text(self.uint(8))),
        pickle.GLOBAL: lambda self: self.push(self.find_class(self.line(), self.line())),
        pickle.STACK_GLOBAL: stack_global,
        pickle.BINPUT: lambda self: self.memo.__setitem__(self.uint(1), self.top()),
        pickle.LONG_BINPUT: lambda self: self.memo.__setitem__(self.uint(4), self.top()),
        pickle.MEMOIZE: lambda self: self.memo.__setitem__(len(self.memo), self.top()),
        pickle.BINGET: lambda self: self.memo_get(self.uint(1)),
        pickle.LONG_BINGET: lambda self: self.memo_get(self.uint(4)),
        pickle.BINPERSID: persistent_load,
        pickle.REDUCE: reduce,
        pickle.BUILD: build,
        pickle.SETITEM: lambda self: self.set_items(self.pop_n(2)),
        pickle.SETITEMS: lambda self: self.set_items(self.pop_mark()),
    }


def _unpickle_state_dict(data, path):
    """{name: _TensorRecord} from data.pkl, every record checked after the whole pickle has run."""
    reader = _StateDictPickle(data)
    try:
        state = reader.load()
    except _Malformed as e:
        raise CheckpointError(f"{path}: data.pkl {e} (at byte {reader.pos})") from None
    if type(state) not in _DICTS:
        raise CheckpointError(f"{path}: data.pkl holds a {_what(state)}, not a state dict")
    for name, record in state.items():
        problem = _record_problem(record)
        if problem:
            raise CheckpointError(f"{path}: tensor {shown(name)} in data.pkl {problem}")
    return state


def _record_problem(record):
    """Why a state dict value is not a tensor we can map, or None."""
    if type(record) is not _TensorRecord:
        return f"is a {_what(record)}, not a tensor"
    storage, offset, size, stride = record
    if type(storage) is not _Storage:
        return f"has a {_what(storage)} for its storage"
    if not (_is_count(offset) and _is_shape(size) and _is_shape(stride) and len(size) == len(stride)):
        return (f"has an invalid size, stride or offset (at most {MAX_NDIM} counts below 2**62, under 2**58 "
                "elements)")
    return None


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
