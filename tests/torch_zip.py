"""Writing torch-format zips without torch, for tests: the pickle opcodes torch.save emits, and raw ones."""
import collections
import io
import pickle
import struct
import zipfile
import zlib

import numpy as np


class Global:
    """A global named by module and name, pickled as GLOBAL without importing it (torch is not installed)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce insists on a callable
        raise AssertionError("never called")

    def __reduce__(self):
        return self.name        # a str: pickle writes a global for it, through TorchPickler.save_global


class Call:
    """Pickles as `func(*args)` (REDUCE), the way torch writes _rebuild_tensor_v2(...)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class Storage:
    def __init__(self, storage_class, key, numel):
        self.storage_class, self.key, self.numel = storage_class, key, numel


class TorchPickler(pickle._Pickler):     # the pure-Python pickler lets us write GLOBAL opcodes ourselves
    def save_global(self, obj, name=None):
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", Global("torch", obj.storage_class), obj.key, "cpu", obj.numel)
        return None


STORAGE_CLASSES = {"float32": "FloatStorage", "float16": "HalfStorage", "bfloat16": "BFloat16Storage",
                   "int8": "CharStorage", "uint8": "ByteStorage"}
NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int8": np.int8, "uint8": np.uint8}


def tensor(storage, offset, size, stride):
    size, stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)    # plain ints, as torch writes
    return Call(Global("torch._utils", "_rebuild_tensor_v2"), storage, int(offset), size, stride, False,
                collections.OrderedDict())


def write_torch_zip(path, state, storages, prefix="archive", byteorder="little"):
    """A torch.save-style zip: prefix/data.pkl (protocol 2), prefix/data/<key> raw little-endian bytes."""
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", buf.getvalue())
        if byteorder is not None:
            z.writestr(f"{prefix}/byteorder", byteorder)
        for key, data in storages.items():
            z.writestr(f"{prefix}/data/{key}", data)
        z.writestr(f"{prefix}/version", "3\n")
    return path


def contiguous_state(name, values, dtype):
    """A state dict holding one contiguous tensor, and its storage bytes."""
    storage = Storage(STORAGE_CLASSES[dtype], "0", values.size)
    strides = np.array(values.strides) // values.itemsize
    return {name: tensor(storage, 0, values.shape, strides)}, {"0": values.tobytes()}


def write_pickle_zip(path, data_pkl, storages=None, prefix="archive"):
    """A torch.save-style zip around raw data.pkl bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", data_pkl)
        z.writestr(f"{prefix}/byteorder", "little")
        for key, data in (storages or {}).items():
            z.writestr(f"{prefix}/data/{key}", data)
    return path


# --- raw pickle opcodes, for pickles no pickler writes ------------------------------------------------------------

def op_global(module, name):
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def op_str(text):
    data = text.encode("utf-8", "surrogatepass")
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def op_int(n):
    if -2**31 <= n < 2**31:
        return pickle.BININT + struct.pack("<i", n)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(data)]) + data


def op_tuple(items):
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def op_storage(key, numel, storage_class="FloatStorage"):
    """The persistent id torch writes for a storage, and the BINPERSID that loads it."""
    return op_tuple([op_str("storage"), op_global("torch", storage_class), op_str(key), op_str("cpu"),
                     op_int(numel)]) + pickle.BINPERSID


def op_tensor(storage, offset, size, stride):
    """_rebuild_tensor_v2(storage, offset, size, stride, False, {}) as REDUCE."""
    return op_global("torch._utils", "_rebuild_tensor_v2") + op_tuple(
        [storage, op_int(offset), op_tuple([op_int(n) for n in size]), op_tuple([op_int(n) for n in stride]),
         pickle.NEWFALSE, pickle.EMPTY_DICT]) + pickle.REDUCE


def op_state_dict(entries):
    """{name: value} of raw (name, value opcodes) pairs: PROTO 2, EMPTY_DICT, SETITEMS, STOP."""
    items = b"".join(op_str(name) + value for name, value in entries)
    return pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.MARK + items + pickle.SETITEMS + pickle.STOP


# --- patching a real torch.save zip -------------------------------------------------------------------------------

CENTRAL_FIELDS = {"version_needed": (6, "<H"), "flags": (8, "<H"), "method": (10, "<H"), "crc": (16, "<I"),
                  "compressed_size": (20, "<I"), "size": (24, "<I"), "header_offset": (42, "<I")}


def central_record(data, suffix):
    """Offset of the central directory record of the member whose name ends with `suffix`."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        pos = z.start_dir
    while data[pos: pos + 4] == b"PK\x01\x02":
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", data, pos + 28)
        if data[pos + 46: pos + 46 + name_length].endswith(suffix.encode()):
            return pos
        pos += 46 + name_length + extra_length + comment_length
    raise KeyError(suffix)


def with_central_field(data, suffix, field, value):
    """`data` with one field of one member's central directory record set to `value`."""
    offset, fmt = CENTRAL_FIELDS[field]
    out = bytearray(data)
    struct.pack_into(fmt, out, central_record(data, suffix) + offset, value)
    return bytes(out)


def member_data_offset(data, suffix):
    """Where the bytes of the member ending with `suffix` start (after its padded local header)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
    return info.header_offset + 30 + name_length + extra_length


# --- zips written byte by byte, claiming whatever a test wants ----------------------------------------------------

def local_header(name, payload, method=0, size=None, crc=None):
    size, crc = len(payload) if size is None else size, zlib.crc32(payload) if crc is None else crc
    return struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0x800, method, 0, 0x21, crc, len(payload), size,
                       len(name.encode()), 0) + name.encode()


def central_header(name, payload, offset, method=0, size=None, crc=None):
    size, crc = len(payload) if size is None else size, zlib.crc32(payload) if crc is None else crc
    return struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0x800, method, 0, 0x21, crc, len(payload),
                       size, len(name.encode()), 0, 0, 0, 0, 0, offset) + name.encode()


def raw_zip(members, aliases=()):
    """A zip of `members` [(name, payload as stored, {method, size, crc})], plus `aliases`: central directory
    records [(name, payload, offset)] for local entries that lie inside another member's bytes."""
    out, central = bytearray(), bytearray()
    for name, payload, claims in members:
        central += central_header(name, payload, len(out), **claims)
        out += local_header(name, payload, **claims) + payload
    for name, payload, offset in aliases:
        central += central_header(name, payload, offset)
    count = len(members) + len(aliases)
    return bytes(out + central + struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, len(central),
                                             len(out), 0))


def deflated_zeros(n_mib):
    """A raw deflate stream of n_mib MiB of zero bytes, about 1 kB per MiB, made without compressing them all:
    a full flush resets the compressor, so one compressed MiB can simply be repeated."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = compressor.compress(bytes(2**20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return piece * n_mib + compressor.flush()
