"""Torch files (zip or legacy format) read without running code from them: torch's own reading of
the archive and the storages, with byol_fast's unpickler
(:class:`byol_fast.weights.unpickler.ArrayUnpickler`) for every object in them.

Not ``torch.load(weights_only=True)``: torch's weights-only allow-list is process-wide, so any code
in the process, from any thread, extends what it admits (admitting numpy's real array functions, as
torch's own refusal message advises, would let a forged numpy dtype reach numpy); and not
``torch.load`` with a pickle module either: it hands a TorchScript archive to ``torch.jit.load``
(running the program) and refuses a pickle module under TORCH_FORCE_WEIGHTS_ONLY_LOAD. So
:func:`read` calls torch's private ``_load`` / ``_legacy_load`` (torch 2.14, pinned) with a pickle
module of its own.

What the file's pickle may name: torch's weights-only list (tensors, storages, dtypes, devices,
sizes, the dense tensor and parameter rebuilds) and what plain pickles may name, each checked where
torch's is not: no storage or tensor of a size the file chooses (``torch.FloatTensor(n)``,
``UntypedStorage(n)``, ``bytearray(n)``, storages larger than the file, expanded views of millions of
elements, views reaching past their storage), no backward hooks, no dunder attributes set on
tensors, persistent ids that are storages and nothing else, every legacy storage filled from the
file (torch would hand back uninitialised memory), no old tar-format files (torch extracts them
without a filter: links out of its folder), no compressed records in a zip file (torch inflates them
whole: a zip bomb).
"""
from __future__ import annotations

import io
import math
import pickle
import tarfile
import types
import zipfile
from pathlib import Path

import torch

from byol_fast.weights.safe_arrays import brief, spend
from byol_fast.weights.unpickler import ALLOWED, ArrayUnpickler, UnsafeFileError, named

# Tensors and storages: never made from a size the file chooses.
_SIZED = {torch.Tensor, torch.nn.Parameter, *torch._tensor_classes, *torch._storage_classes}
MAX_EXPANDED = 1 << 24  # elements a view may show beyond its storage's (a broadcast buffer), at most
# dtypes of weights: not quantized, bit or 4-bit types (torch builds those without their quantizer)
_PLAIN_DTYPES = {d for d in vars(torch).values() if isinstance(d, torch.dtype)
                 and (d.is_floating_point or d.is_complex) and "float4" not in str(d)} | {
    torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64}


def _sized(obj) -> bool:
    """Whether ``obj`` is one of the tensor or storage classes (checked as a type before it is hashed:
    a file's object may be unhashable, or costly to hash)."""
    return isinstance(obj, type) and obj in _SIZED


class _Read:
    """What one read has seen: the file's size, the storages its pickle asked for, the last pickle
    read by ``load`` (the legacy format's list of stored keys)."""

    def __init__(self, size: int) -> None:
        self.size, self.storage_bytes, self.keys, self.last = size, 0, set(), None


def _no_hooks(hooks) -> None:
    if hooks:  # an OrderedDict of callables run on backward
        raise UnsafeFileError("loading it would attach backward hooks to a tensor")


def _plain_state(state) -> None:
    items = [] if state is None else [*(state[0] or {}), *(state[1] or {})] if isinstance(state, tuple) else [*state]
    if any(not isinstance(k, str) or k.startswith("_") for k in items):  # _backward_hooks, __class__, ...
        raise UnsafeFileError("loading it would set private attributes on a tensor")


def _check_view(storage, offset, size, stride, dtype=None) -> None:
    """A tensor's view must lie inside its storage (torch would grow the storage to fit, handing back
    uninitialised memory) and show at most MAX_EXPANDED elements beyond those stored."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafeFileError("a tensor without its storage")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or any(type(n) is not int or n < 0 for n in (offset, *size, *stride)):
        raise UnsafeFileError(f"a tensor of offset {brief(offset)}, size {brief(size)}, stride {brief(stride)}")
    dtype = dtype or storage.dtype
    if dtype not in _PLAIN_DTYPES:
        raise UnsafeFileError(f"a tensor of {dtype} (weights are plain numbers)")
    count = math.prod(size)
    if count == 0:
        return
    reach = (offset + sum((n - 1) * step for n, step in zip(size, stride)) + 1) * torch._utils._element_size(dtype)
    held = storage._untyped_storage.nbytes()
    if reach > held:
        raise UnsafeFileError(f"a tensor reaching {reach} bytes into a storage of {held}")
    if count > storage._size():  # a broadcast view: copied out later it takes all its elements' memory
        if count > MAX_EXPANDED:  # _size: TypedStorage's, without a warning
            raise UnsafeFileError(f"a tensor view of {count} elements over {storage._size()} stored")
        spend((count - storage._size()) * torch._utils._element_size(dtype))


def _rebuild_tensor(storage, offset, size, stride):
    _check_view(storage, offset, size, stride)
    return torch._utils._rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
    _check_view(storage, offset, size, stride)
    _no_hooks(backward_hooks)
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    _check_view(storage, offset, size, stride, dtype)
    _no_hooks(backward_hooks)
    return torch._utils._rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype,
                                           metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    _no_hooks(backward_hooks)
    return torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    _no_hooks(backward_hooks)
    _plain_state(state)
    return torch._utils._rebuild_parameter_with_state(data, requires_grad, backward_hooks, state)


_REBUILDS = {f.__name__: f for f in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter,
                                     _rebuild_parameter_with_state)}
_REBUILDS["_rebuild_meta_tensor_no_storage"] = torch._utils._rebuild_meta_tensor_no_storage  # no memory


def _rebuild_from_type_v2(func, new_type, args, state):
    """A tensor with attributes, for tensor rebuilds and tensor classes only (torch's own would call
    any allowed callable and set the state on whatever it returns)."""
    if func not in _REBUILDS.values() or not _sized(new_type):
        raise UnsafeFileError(f"loading it would call {named(func)} to rebuild a {named(new_type)}")
    _plain_state(state)
    return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


def _bytearray(data=b"") -> bytearray:
    """``bytearray(data)`` as protocol 2 writes one; never ``bytearray(n)`` (n bytes from a few)."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafeFileError(f"loading it would call bytearray of a {type(data).__name__}")
    return bytearray(data)


def _allowed() -> dict:
    from torch import _weights_only_unpickler as weights_only

    torch_own = {tuple(name.rsplit(".", 1)): obj for name, obj in weights_only._get_allowed_globals().items()
                 if not name.startswith("torch._utils._rebuild")}  # the rebuilds: only ours below
    return {**torch_own, **{("torch._utils", name): f for name, f in _REBUILDS.items()},
            ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
            ("builtins", "bytearray"): _bytearray, **ALLOWED}


class TorchUnpickler(ArrayUnpickler):
    """:class:`ArrayUnpickler` for the pickles inside a torch file; ``read_state`` is set per read."""

    allowed = _allowed()
    read_state: _Read

    def _refuse_sized(self, cls, args) -> None:
        if _sized(cls) and args:  # torch.FloatTensor(10**10), UntypedStorage(n): memory of the file's choosing
            raise UnsafeFileError(f"loading it would call {named(cls)} with arguments")

    def load_reduce(self) -> None:
        self._refuse_sized(self.stack[-2], self.stack[-1])
        ArrayUnpickler.load_reduce(self)

    def load_newobj(self) -> None:
        self._refuse_sized(self.stack[-2], self.stack[-1])
        pickle._Unpickler.dispatch[pickle.NEWOBJ[0]](self)

    def load_binpersid(self) -> None:
        self._check_storage_id(self.stack[-1])
        pickle._Unpickler.dispatch[pickle.BINPERSID[0]](self)

    def _check_storage_id(self, pid) -> None:
        """Persistent ids name storages only (torch's legacy reader would also take a "module" and
        write a diff of its source into the current folder), typed, within the file's size."""
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise UnsafeFileError("a persistent id that is not a storage")
        storage_type, key, location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not (isinstance(storage_type, torch.serialization.StorageType)
                or _sized(storage_type)) \
                or not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or numel < 0 \
                or not (view is None or (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                                         and all(type(n) is int and n >= 0 for n in view[1:]))):
            raise UnsafeFileError("a storage id of unexpected fields")
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            raise UnsafeFileError(f"a storage of type {named(storage_type)}")
        state = self.read_state
        if key not in state.keys:
            state.keys.add(key)
            state.storage_bytes += numel * torch._utils._element_size(dtype)
            if state.storage_bytes > state.size:
                raise UnsafeFileError(f"storages of {state.storage_bytes} bytes in a file of {state.size}")

    def load_unused(self) -> None:
        """INST, OBJ, NEWOBJ_EX, PERSID: what torch.save never writes (the first three make objects
        past the checks above)."""
        raise UnsafeFileError("a pickle opcode torch files never hold")

    dispatch = {**ArrayUnpickler.dispatch, pickle.REDUCE[0]: load_reduce, pickle.NEWOBJ[0]: load_newobj,
                pickle.BINPERSID[0]: load_binpersid,
                **dict.fromkeys([pickle.INST[0], pickle.OBJ[0], pickle.NEWOBJ_EX[0], pickle.PERSID[0]], load_unused)}


def _pickle_module(state: _Read) -> types.ModuleType:
    """A pickle module for torch's readers, its unpickler bound to this read."""
    unpickler = type("Unpickler", (TorchUnpickler,), {"read_state": state})

    def load(file, **kwargs):
        state.last = unpickler(file, **kwargs).load()
        return state.last

    module = types.ModuleType("byol_fast.weights.safe_torch.pickle")
    module.Unpickler, module.load = unpickler, load
    return module


def _only_stored_records(f) -> None:
    """Every record of the zip archive ``f`` stored as it is: torch.save never compresses, and torch's
    archive reader inflates a compressed record whole (a few hundred KB of deflated zeros become
    gigabytes), so a compressed record is refused before anything of it is read."""
    f.seek(0)
    with zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                method = _ZIP_METHODS.get(info.compress_type, f"method {info.compress_type}")
                raise UnsafeFileError(f"its record {brief(info.filename)} is compressed ({method}), which "
                                      "torch.save never does, and it could inflate to far more than the file holds")


_ZIP_METHODS = {zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}


def read(path: Path, map_location="cpu"):
    """The object in the torch file ``path``; UnsafeFileError for what it must not do."""
    serialization = torch.serialization
    state = _Read(path.stat().st_size)
    try:
        with open(path, "rb") as f:
            if zipfile.is_zipfile(f):
                f.seek(0)
                with serialization._open_zipfile_reader(f) as archive:
                    if serialization._is_torchscript_zip(archive):  # (by its records' names)
                        raise UnsafeFileError("it is a TorchScript program: loading it would run its code "
                                              "(torch.jit.load it yourself if you trust it)")
                    _only_stored_records(f)
                    return serialization._load(archive, map_location, _pickle_module(state), encoding="utf-8")
            if tarfile.is_tarfile(path):
                raise UnsafeFileError("it is a tar archive (torch's oldest format, which torch extracts unfiltered)")
            f.seek(0)
            data = io.BytesIO(f.read())  # no fileno: torch's legacy reader never tries it as a tar archive
        obj = serialization._legacy_load(data, map_location, _pickle_module(state), encoding="utf-8")
        if not isinstance(state.last, list) or not state.keys <= set(state.last):
            raise UnsafeFileError("storages the file does not hold (torch would return uninitialised memory)")
        return obj
    finally:
        serialization._serialization_tls.map_location = None  # torch's _load leaves it set when it fails
