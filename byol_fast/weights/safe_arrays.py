"""numpy arrays, scalars and dtypes rebuilt from a pickle's data without handing numpy the file's state.

numpy pickles an array as ``_reconstruct(ndarray, (0,), b"b")`` followed by a BUILD of
``(version, shape, dtype, is_fortran, raw)``, and a dtype as ``dtype("f4", False, True)`` followed
by a BUILD of its state (byte order, fields, sizes, flags). numpy trusts that state: a dtype whose
state claims object fields but whose flags say "no objects", or an object array given raw bytes,
makes numpy read the file's bytes as pointers to Python objects (a crash, or worse, when the array is
freed). So a reader that admits numpy's names must not let numpy's own ``__setstate__`` see them.

Here each of those names stands for a small builder instead:

- :class:`DtypeSpec` (for ``numpy.dtype``) keeps only the type code the file gives (``"f4"``, ``"U2"``,
  ``"O8"``, ``"M8"``), the byte order and a datetime unit, and makes the dtype from them with
  ``np.dtype(code)``: flags and sizes are numpy's, never the file's; structured and sub-array dtypes
  are refused;
- :class:`ArraySpec` (for ``numpy.ndarray`` and :func:`reconstruct`) checks the shape and the data
  (raw bytes of exactly shape x itemsize for plain dtypes, a list of objects for object arrays) and
  builds the array with ``np.frombuffer`` or element by element;
- :func:`scalar` (for numpy's scalar reconstruction) the same for one value.

byol_fast's unpickler (:mod:`byol_fast.weights.unpickler`, for plain pickles and, through
:mod:`byol_fast.weights.safe_torch`, torch files) maps numpy's names to these, and :func:`resolve`
replaces the specs in what it returns by the arrays and dtypes built, within the budgets of
:func:`reading`.
"""
from __future__ import annotations

import contextlib
import math
import re
import threading

import numpy as np


class UnsafeArrayError(ValueError):
    """Array or dtype data that numpy must not be handed; the message says what was wrong."""


def brief(value) -> str:
    """``value`` for a message: a short string or number as it is, anything else by its type (a
    file's tuples can nest to 10**30 elements in a few KB: never format them whole)."""
    if isinstance(value, (str, bytes)):
        return repr(value[:40])
    if type(value) is int and value.bit_length() > 128:
        return f"an int of {value.bit_length()} bits"
    if type(value) in (int, float, bool) or value is None:
        return repr(value)[:40]
    return f"a {type(value).__name__}"


_DATETIME_UNIT = re.compile(r"Y|M|W|D|h|m|s|ms|us|μs|ns|ps|fs|as|generic")
MAX_DIMS = 64  # numpy's own limit
MAX_NESTING = 32  # object arrays holding object arrays: numpy frees such a chain recursively, in C


class DtypeSpec:
    """A numpy dtype as a pickle describes it: ``DtypeSpec(code, align, copy)`` then ``__setstate__``."""

    dtype = None  # also for an instance made without __init__ (pickle's NEWOBJ)

    def __init__(self, code=None, align=False, copy=False):
        if not isinstance(code, str) or not re.fullmatch(r"[a-zA-Z?]\d*", code):
            raise UnsafeArrayError(f"numpy dtype {brief(code)}: only a plain type code is read")
        try:
            self._base = np.dtype(code)
        except TypeError as e:
            raise UnsafeArrayError(f"numpy dtype {code!r} ({e})") from None

    def __setstate__(self, state) -> None:
        if not hasattr(self, "_base") or self.dtype is not None:
            raise UnsafeArrayError("numpy dtype state without its type code, or given twice")
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise UnsafeArrayError("numpy dtype state of an unknown layout")
        order, subarray, names, fields = state[1:5]
        if subarray is not None or names is not None or fields is not None:
            raise UnsafeArrayError("structured or sub-array numpy dtype (weights are plain arrays)")
        if order not in ("<", ">", "|", "="):
            raise UnsafeArrayError(f"numpy dtype byte order {brief(order)}")
        dtype = self._base
        if dtype.kind in "mM":
            dtype = _with_unit(dtype, state[8] if len(state) == 9 else None)
        if order in "<>" and dtype.byteorder != "|":
            dtype = dtype.newbyteorder(order)
            dtype = dtype.newbyteorder("=") if dtype.isnative else dtype
        self.dtype = dtype  # flags, item size and alignment are numpy's for this code, never the file's

    def resolved(self) -> np.dtype:
        if self.dtype is None:
            raise UnsafeArrayError("numpy dtype used before its state was read")
        return self.dtype


def _with_unit(dtype: np.dtype, extra) -> np.dtype:
    """A datetime64/timedelta64 dtype with the unit numpy writes as ``(metadata, (unit, num, den, events))``
    (numpy 1 wrote the unit tuple alone)."""
    units = extra[1] if isinstance(extra, tuple) and len(extra) == 2 else extra
    if units is None:
        return dtype
    if not (isinstance(units, tuple) and len(units) == 4 and isinstance(units[0], bytes)
            and type(units[1]) is int and units[1] > 0):
        raise UnsafeArrayError(f"numpy datetime unit {brief(units)}")
    unit = units[0].decode("utf-8", "replace")
    if not _DATETIME_UNIT.fullmatch(unit):
        raise UnsafeArrayError(f"numpy datetime unit {unit!r}")
    return np.dtype(f"{dtype.str[1:3]}[{units[1]}{unit}]") if unit != "generic" else dtype


class ArraySpec:
    """A numpy array as a pickle describes it: made by :func:`reconstruct`, filled by ``__setstate__``."""

    array = None  # also for an instance made without __init__ (pickle's NEWOBJ)
    nesting = 0  # object arrays inside it, one in another

    def __setstate__(self, state) -> None:
        if self.array is not None:
            raise UnsafeArrayError("numpy array state given twice")
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafeArrayError("numpy array state of an unknown layout")
        shape, dtype, fortran, data = state[-4:]
        if not (isinstance(shape, tuple) and len(shape) <= MAX_DIMS
                and all(type(n) is int and 0 <= n < 2**62 for n in shape)):
            raise UnsafeArrayError(f"numpy array shape {brief(shape)}")
        if not isinstance(dtype, DtypeSpec):
            raise UnsafeArrayError("numpy array without a numpy dtype")
        dtype, count, order = dtype.resolved(), math.prod(shape), "F" if fortran else "C"
        spend(count * (8 if dtype.hasobject else dtype.itemsize))
        if dtype.hasobject:
            if not isinstance(data, list) or len(data) != count:
                raise UnsafeArrayError("numpy object array whose data is not its list of objects")
            inner = [item for item in data if isinstance(item, (ArraySpec, np.ndarray))]
            if any(isinstance(item, np.ndarray) and item.dtype.hasobject for item in inner):
                raise UnsafeArrayError("numpy object array holding an object array not read from the file")
            self.nesting = 1 + max((item.nesting for item in inner if isinstance(item, ArraySpec)), default=0)
            if self.nesting > MAX_NESTING:
                raise UnsafeArrayError(f"numpy object arrays nested over {MAX_NESTING} deep")
            flat = np.empty(count, dtype=object)
            for i, item in enumerate(data):
                flat[i] = resolve(item)
        else:
            if not isinstance(data, (bytes, bytearray)) or len(data) != count * dtype.itemsize:
                raise UnsafeArrayError(f"numpy array data of {len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__}"
                                       f" bytes for shape {shape} of {dtype}")
            flat = np.frombuffer(data, dtype=dtype, count=count)
            if dtype.kind == "U":
                _check_code_points(flat, dtype)
            flat = flat.astype(dtype.newbyteorder("=")) if not dtype.isnative else flat.copy()  # as numpy does
        self.array = flat.reshape(shape, order=order)

    def resolved(self) -> np.ndarray:
        if self.array is None:
            raise UnsafeArrayError("numpy array used before its state was read")
        return self.array


def _check_code_points(flat: np.ndarray, dtype: np.dtype) -> None:
    """numpy's unicode strings are UCS-4 code points; any above U+10FFFF (or a surrogate) makes a
    string numpy cannot build (a SystemError on reading it)."""
    points = flat.view(dtype.byteorder + "u4")  # "=", "<" or ">": the strings' own byte order
    if ((points > 0x10FFFF) | ((points >= 0xD800) & (points <= 0xDFFF))).any():
        raise UnsafeArrayError("numpy unicode array holding code points that are not characters")


def reconstruct(subtype, shape, typecode) -> ArraySpec:
    """numpy's ``_reconstruct(ndarray, (0,), b"b")``, the empty array a pickle then fills."""
    if subtype is not ArraySpec:
        raise UnsafeArrayError(f"numpy array of subtype {brief(subtype)}")
    return ArraySpec()


def scalar(dtype, data=None):
    """numpy's scalar reconstruction ``scalar(dtype, raw bytes)`` (an object dtype holds the object)."""
    if not isinstance(dtype, DtypeSpec):
        raise UnsafeArrayError("numpy scalar without a numpy dtype")
    dtype = dtype.resolved()
    if dtype.hasobject:
        return resolve(data)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafeArrayError(f"numpy scalar data for {dtype}")
    flat = np.frombuffer(data, dtype=dtype, count=1)
    if dtype.kind == "U":
        _check_code_points(flat, dtype)
    return flat[0]


class _Reads(threading.local):
    """This thread's current read (see :func:`reading`): the containers :func:`resolve` has walked,
    and the bytes of arrays it may still build."""

    seen: dict | None = None
    left: int | None = None


_READS = _Reads()
SLACK = 1 << 20  # bytes of arrays a read may build beyond its file's size


@contextlib.contextmanager
def reading(file_bytes: int):
    """One read of a file of ``file_bytes``: :func:`resolve` walks each container once however often
    the file refers to it (a file naming one big list a million times must not cost a million
    walks), and its arrays hold at most about the file's bytes (8 per object): a file's arrays
    carry their data in the file, unless the file reuses one piece of data for many arrays."""
    outer = _READS.seen, _READS.left
    _READS.seen, _READS.left = {}, file_bytes + SLACK
    try:
        yield
    finally:
        _READS.seen, _READS.left = outer


def spend(nbytes: int) -> None:
    """Charge ``nbytes`` of memory built from the file to the current read (see :func:`reading`)."""
    if _READS.left is not None:
        _READS.left -= nbytes
        if _READS.left < 0:
            raise UnsafeArrayError("arrays of more bytes than the file holds (one piece of data reused)")


def resolve(obj):
    """``obj`` with the specs in its dicts, lists and tuples (namedtuples too) replaced by the arrays
    and dtypes they built; other objects are returned as they are."""
    seen = _READS.seen if _READS.seen is not None else {}
    return _resolve(obj, seen)


def _resolve(obj, seen: dict):
    if isinstance(obj, (ArraySpec, DtypeSpec)):
        return obj.resolved()
    if not isinstance(obj, (dict, list, tuple)):
        return obj
    if id(obj) in seen:  # shared or cyclic containers are visited once (the object is kept: ids stay unique)
        return seen[id(obj)][1]
    seen[id(obj)] = (obj, obj)
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _resolve(value, seen)
        return obj
    if isinstance(obj, list):
        obj[:] = [_resolve(item, seen) for item in obj]
        return obj
    items = [_resolve(item, seen) for item in obj]
    if all(a is b for a, b in zip(items, obj)):
        return obj
    rebuilt = type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    seen[id(obj)] = (obj, rebuilt)
    return rebuilt


# The names numpy 1 and 2 write, and what each stands for in byol_fast's readers.
GLOBALS = {
    **{f"numpy.{core}.{module}.{name}": f for core in ("_core", "core") for module in ("multiarray", "_multiarray_umath")
       for name, f in (("_reconstruct", reconstruct), ("scalar", scalar))},
    "numpy.ndarray": ArraySpec,
    "numpy.dtype": DtypeSpec,
}
