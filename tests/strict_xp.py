"""An array module like CuPy without a GPU: NumPy underneath, but no implicit way back to NumPy.

bcnp's forward pass is written against an array module `xp`. On the GPU, xp is CuPy, whose arrays refuse to
become NumPy arrays behind your back: `np.asarray(a)` and `a + numpy_array` raise TypeError. Code tested only
with xp = numpy never meets that, so a stray `np.` call would first fail on a GPU. This module makes CI meet it:

    import strict_xp
    model = bcnp.api.to_device(cpu_model, xp=strict_xp)     # every weight a StrictArray
    model.logits(ids)                                           # the whole forward pass, through strict_xp

A `StrictArray` wraps a NumPy array. Its operators, methods and this module's functions return StrictArrays;
Python and NumPy scalars mix freely (as in CuPy); `.get()` returns NumPy (as in CuPy). Refused with TypeError:
- `np.asarray(a)` / `np.array(a)` and anything else that calls `__array__`;
- NumPy ufuncs and functions on it (`np.exp(a)`, `np.concatenate([a, b])`) -- stricter than CuPy, which would
  dispatch them to itself: model code must say `xp.`;
- a NumPy array as an operand, an index or an argument of this module's functions (except `asarray`/`array`,
  the explicit host-to-device copy).
"""
import types

import numpy as np


class StrictArray:
    __array_ufunc__ = None                  # NumPy ufuncs refuse us, and ndarray <op> StrictArray defers to us
    __hash__ = None

    def __init__(self, array):
        self._a = array

    # --- no way back to NumPy but .get() ---

    def __array__(self, dtype=None, copy=None):
        raise TypeError("strict_xp: implicit conversion to a NumPy array is not allowed (use .get())")

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(f"strict_xp: numpy.{func.__name__} called on a device array (use the xp module)")

    def get(self):
        return self._a.copy()

    def __repr__(self):
        return f"StrictArray({self._a!r})"

    # --- attributes and methods: NumPy's, with arguments unwrapped and results wrapped ---

    SHAPE_ATTRIBUTES = ("shape", "dtype", "ndim", "size", "nbytes", "itemsize", "strides")
    METHODS = ("astype", "reshape", "transpose", "swapaxes", "squeeze", "ravel", "flatten", "copy", "view",
               "max", "min", "sum", "mean", "prod", "var", "std", "argmax", "argmin", "cumsum", "any", "all",
               "repeat", "take", "clip", "round", "dot", "fill")

    def __getattr__(self, name):
        if name in StrictArray.SHAPE_ATTRIBUTES:
            return getattr(self._a, name)
        if name in StrictArray.METHODS:
            method = getattr(self._a, name)
            return lambda *args, **kwargs: wrap(method(*unwrap(args), **unwrap(kwargs)))
        raise AttributeError(f"strict_xp: StrictArray has no attribute {name!r}")

    @property
    def T(self):
        return StrictArray(self._a.T)

    @property
    def data(self):
        """As CuPy's `.data.ptr`: the address of the first element (what a kernel launch passes)."""
        return types.SimpleNamespace(ptr=self._a.ctypes.data)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (wrap(row) for row in self._a)

    def __getitem__(self, key):
        return wrap(self._a[unwrap(key)])

    def __setitem__(self, key, value):
        self._a[unwrap(key)] = unwrap(value)

    # size-1 arrays to Python numbers synchronise on a GPU but are allowed, as in CuPy
    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __bool__(self):
        return bool(self._a)


def _binary(name):
    def op(self, other):
        return wrap(getattr(self._a, name)(unwrap(other)))
    op.__name__ = name
    return op


def _inplace(name):
    def op(self, other):
        getattr(self._a, name)(unwrap(other))
        return self
    op.__name__ = name
    return op


def _unary(name):
    def op(self):
        return wrap(getattr(self._a, name)())
    op.__name__ = name
    return op


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
              "lshift", "rshift"):
    setattr(StrictArray, f"__{_name}__", _binary(f"__{_name}__"))
    setattr(StrictArray, f"__r{_name}__", _binary(f"__r{_name}__"))
    setattr(StrictArray, f"__i{_name}__", _inplace(f"__i{_name}__"))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(StrictArray, f"__{_name}__", _binary(f"__{_name}__"))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(StrictArray, f"__{_name}__", _unary(f"__{_name}__"))


def unwrap(x):
    """StrictArray -> its NumPy array, through lists, tuples and dicts; a NumPy array is refused."""
    if isinstance(x, StrictArray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"strict_xp: a NumPy array {x.dtype}{list(x.shape)} where a device array is expected "
                        "(use xp.asarray)")
    if isinstance(x, (list, tuple)):
        return type(x)(unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: unwrap(v) for k, v in x.items()}
    return x


def wrap(x):
    """NumPy results -> StrictArray (NumPy scalars from reductions become 0-d arrays, as in CuPy)."""
    if isinstance(x, np.ndarray):
        return StrictArray(x)
    if isinstance(x, np.generic):
        return StrictArray(np.asarray(x))
    if isinstance(x, (list, tuple)):
        return type(x)(wrap(v) for v in x)
    return x


def _function(f):
    def function(*args, **kwargs):
        return wrap(f(*unwrap(args), **unwrap(kwargs)))
    function.__name__ = f.__name__
    function.__doc__ = f"strict_xp.{f.__name__}: numpy.{f.__name__} on StrictArrays"
    return function


def asarray(a, dtype=None):
    """The explicit host-to-device copy: NumPy arrays, lists and scalars are welcome here."""
    if isinstance(a, StrictArray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    return StrictArray(np.array(a, dtype=dtype))


def array(a, dtype=None):
    return StrictArray(np.array(a._a if isinstance(a, StrictArray) else a, dtype=dtype))


ndarray = StrictArray
# dtypes and constants are NumPy's own, as in CuPy
from numpy import (bool_, dtype, e, finfo, float16, float32, float64, iinfo, inf, int8, int16,  # noqa: E402,F401
                   int32, int64, nan, newaxis, pi, uint8, uint16, uint32)

for _f in (np.zeros, np.ones, np.empty, np.full, np.zeros_like, np.ones_like, np.empty_like, np.full_like,
           np.arange, np.linspace, np.ascontiguousarray, np.concatenate, np.stack, np.where, np.exp, np.log,
           np.sqrt, np.cos, np.sin, np.tanh, np.abs, np.sign, np.maximum, np.minimum, np.mean, np.sum, np.max,
           np.min, np.argmax, np.matmul, np.dot, np.einsum, np.repeat, np.take, np.take_along_axis, np.tril,
           np.triu, np.outer, np.clip, np.isfinite, np.isnan, np.isinf, np.all, np.any, np.reshape, np.transpose,
           np.broadcast_to, np.expand_dims, np.squeeze, np.round, np.floor, np.trunc, np.cumsum, np.argsort,
           np.sort, np.square, np.reciprocal, np.power, np.multiply, np.add, np.subtract, np.divide):
    globals()[_f.__name__] = _function(_f)
