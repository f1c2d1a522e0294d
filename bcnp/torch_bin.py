"""Read a torch `.bin` checkpoint without torch and without unpickling: the zip, then `data.pkl` interpreted.

Every member's local header is checked against the zip directory and no two members may overlap; the small
members are read within a size cap, their CRC verified. `data.pkl` is run by `_StateDictPickle`, an interpreter
of the ~30 opcodes a state dict uses, which knows only the few torch names a state dict needs and builds bcnp's
own `Tensor` records: no pickle code ever runs, and nothing can alter a record once built.
"""
import collections
import os
import pickle
import pickletools
import struct
import zipfile
import zlib

from .tensor import MAX_NDIM, NUMPY_DTYPES, CheckpointError, Tensor, _is_count, _is_shape, map_file, shown

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
