"""A checkpoint's tensors as records over a read-only memory map, and the one error every reader raises.

`Tensor` points into the map of its file; values are read only when asked for (`numpy()`, `float32()`,
`float16()`), refusing NaN and infinity by index. The readers of torch `.bin` zips (bcnp.torch_bin) and of
safetensors and checkpoint directories (bcnp.checkpoint) build them, and report every malformed input as one
`CheckpointError` naming the file, with names from the file shown only through `shown()` (escaped, cut).
"""
import math
import mmap
import os

import numpy as np


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


# --- shapes from a file -----------------------------------------------------------------------------------------------

MAX_COUNT = 2**62        # sizes, strides, offsets and element counts are below this (int64 must hold products)
MAX_NDIM = 32            # numpy's limit
MAX_ELEMENTS = 2**58     # numpy refuses a shape whose nonzero sizes times the item size reach 2**63, zeros or not


def _is_count(n):
    return type(n) is int and 0 <= n < MAX_COUNT


def _is_shape(shape, kind=tuple):
    return type(shape) is kind and len(shape) <= MAX_NDIM and all(_is_count(n) for n in shape) and \
        math.prod(n for n in shape if n) < MAX_ELEMENTS
