"""The unpickler behind every pickle-based file byol_fast reads: an allow-list, never code.

:class:`ArrayUnpickler` admits numpy arrays, scalars and dtypes (numpy's names stand for the checked
builders of :mod:`byol_fast.weights.safe_arrays`), also as ``dill`` writes them,
``collections.OrderedDict``, JAX arrays as the numpy arrays they hold, the plain-data classes of
:data:`DATA_CLASSES` as inert :class:`Unread` stand-ins and the functions their objects name
(:data:`DATA_FUNCTIONS`) as :class:`FunctionName`; nothing else. It sets state only on the builders and stand-ins, adds items
to lists and dicts only, hashes only scalar keys and short flat tuples, and keeps each file within
budgets. :mod:`byol_fast.weights.safe_torch` extends it with what torch files need; the dispatch by
file kind is :mod:`byol_fast.weights.safe_load`.
"""
from __future__ import annotations

import _compat_pickle
import collections
import pickle
import threading

from byol_fast.weights import safe_arrays

MAX_FIELDS, MAX_CLASSES = 64, 64  # of a namedtuple class dill writes, and such classes per file


class UnsafeFileError(ValueError):
    """A file that would run code to load; the message names the file and the callable."""


class Unread:
    """An object of a plain-data class that training scripts put beside their weights (the script's
    ``argparse.Namespace``, mmengine's log buffers), rebuilt without its class: the pickled attributes
    are kept in ``state`` and nothing of the class's code runs. byol_fast reads no weights from it."""

    kind = "object"

    def __setstate__(self, state) -> None:
        if "state" in self.__dict__:
            raise UnsafeFileError(f"{self.kind} given its state twice")
        self.__dict__["state"] = safe_arrays.resolve(state)

    def __repr__(self) -> str:
        return f"<{self.kind}, not read>"


def _unread(kind: str) -> type:
    return type(kind.rsplit(".", 1)[-1], (Unread,), {"kind": kind, "__module__": __name__})


# Plain-data classes found beside the weights of other projects' checkpoints: admitted as Unread
# stand-ins, in torch files and plain pickles alike (anything else a file names is refused).
DATA_CLASSES = {name: _unread(name) for name in (
    "argparse.Namespace",  # training scripts saving their arguments (torchvision's references, DINO, ...)
    "mmengine.logging.history_buffer.HistoryBuffer",  # an mmengine training checkpoint's message_hub
)}


class FunctionName:
    """A function that a plain-data object holds in its state, kept as its name and never called:
    mmengine's HistoryBuffer keeps its statistics methods (``HistoryBuffer.min``, ...) in every
    buffer's state. One shared object per name; no opcode of a file changes it (it takes no state)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "name", name)

    def __setattr__(self, key, value) -> None:
        raise AttributeError("a FunctionName is read-only")

    def __repr__(self) -> str:
        return f"<function {self.name}, not read>"


# (stand-in class, attribute) -> the FunctionName it stands for: the functions the classes of
# DATA_CLASSES name in their objects' state.
DATA_FUNCTIONS = {("mmengine.logging.history_buffer.HistoryBuffer", method):
                  FunctionName(f"mmengine.logging.history_buffer.HistoryBuffer.{method}")
                  for method in ("min", "max", "current", "mean")}


def _data_function(owner, name, *default) -> FunctionName:
    """``getattr(cls, name)``, how pickle below protocol 4 names a function defined in a class (mmengine's
    ``HistoryBuffer.min``): taken only as that pattern, ``cls`` a stand-in of DATA_CLASSES and ``name``
    one of its functions in DATA_FUNCTIONS, which gives the function's name. Any other use of
    ``builtins.getattr`` is refused as the call it would be."""
    kind = owner.kind if isinstance(owner, type) and issubclass(owner, Unread) else None
    function = DATA_FUNCTIONS.get((kind, name)) if kind and type(name) is str and not default else None
    if function is None:
        raise UnsafeFileError(f"loading it would call builtins.getattr on {named(owner)}")
    return function


def _jax_array(rebuild, args, state, aval_state) -> safe_arrays.ArraySpec:
    """What pickling a JAX array (``jaxlib``'s ``ArrayImpl``, jax 0.4 and later) writes:
    ``jax._src.array._reconstruct_array(numpy's _reconstruct, its arguments, the numpy array's state,
    {"weak_type": bool})``, which jax would turn into a device array. Read as the numpy array alone,
    jax never imported: only numpy's reconstruction (the checked builder standing for it) is accepted as
    ``rebuild``, and nothing but the weak-type flag beside it."""
    if rebuild is not safe_arrays.reconstruct:
        raise UnsafeFileError(f"a jax array rebuilt by {named(rebuild)}")
    if not isinstance(args, tuple) or type(aval_state) is not dict or set(aval_state) - {"weak_type"} \
            or type(aval_state.get("weak_type", False)) is not bool:
        raise UnsafeFileError("a jax array of other arguments than jax writes")
    array = rebuild(*args)
    array.__setstate__(state)
    return array


def _dill_array(rebuild, args, state, attributes=None) -> safe_arrays.ArraySpec:
    """What ``dill.dump`` (0.3.6 and later) writes for a numpy array (``dill._dill._create_array``):
    numpy's own reconstruction, then the array's state. Only that reconstruction (here the checked
    builder standing for it) is accepted as ``rebuild``, and only an array without instance
    attributes (a plain array has none)."""
    if rebuild is not safe_arrays.reconstruct:
        raise UnsafeFileError(f"dill's array rebuilt by {named(rebuild)}")
    if attributes:
        raise UnsafeFileError("dill's array with attributes")
    array = rebuild(*args)
    array.__setstate__(state)
    return array


class _Budget(threading.local):
    """What this thread's current read has made (see ``byol_fast.weights.safe_load._guarded``)."""

    classes = 0


BUDGET = _Budget()


def _dill_namedtuple(name, fields, module, defaults=None) -> type:
    """What ``dill.dump`` writes for a namedtuple class (``dill._dill._create_namedtuple``; dill would
    import ``module`` to find it): the stand-in below for a class of DeepMind's release, else a new
    namedtuple class with those fields, as inert as a tuple; nothing is imported."""
    if type(name) is not str or type(module) is not str:
        raise UnsafeFileError(f"dill's namedtuple named by {safe_arrays.brief(name)} in {safe_arrays.brief(module)}")
    short = name.rsplit(".", 1)[-1]
    known = ALLOWED.get((module, short))
    if isinstance(known, type) and issubclass(known, tuple):
        return known
    if not isinstance(fields, (list, tuple)) or len(fields) > MAX_FIELDS or any(type(f) is not str for f in fields):
        raise UnsafeFileError(f"dill's namedtuple {short[:40]!r} with over {MAX_FIELDS} fields or fields not named")
    if defaults is not None and (not isinstance(defaults, (list, tuple)) or len(defaults) > len(fields)):
        raise UnsafeFileError(f"dill's namedtuple {short[:40]!r} with defaults of {safe_arrays.brief(defaults)}")
    BUDGET.classes += 1  # each a new class: a few bytes of file each, kilobytes of memory
    if BUDGET.classes > MAX_CLASSES:
        raise UnsafeFileError(f"more than {MAX_CLASSES} namedtuple classes in one file")
    try:
        return collections.namedtuple(short, list(fields), defaults=defaults, module=str(module))
    except (TypeError, ValueError) as e:
        raise UnsafeFileError(f"dill's namedtuple {safe_arrays.brief(name)} ({str(e)[:120]})") from None


class _Module(str):
    """A module as dill 0.3 names one (``dill._dill._import_module(name)``), never imported: only
    :func:`_dill_attribute` reads from it, and only what the allow-list holds."""


def _dill_module(name) -> _Module:
    if type(name) is not str:
        raise UnsafeFileError(f"dill's module named by {safe_arrays.brief(name)}")
    return _Module(name)


def _dill_attribute(module, name):
    """``dill._dill._get_attr(module, name)``: dill 0.3 writes numpy's array reconstruction (a built-in
    function) and ``_codecs.encode`` this way; the allow-list's entry for ``module.name``, nothing else."""
    if type(module) is not _Module or type(name) is not str or (str(module), name) not in ALLOWED:
        named = f"{module[:80]}.{name[:80]}" if isinstance(module, str) and isinstance(name, str) else \
            f"{safe_arrays.brief(module)}.{safe_arrays.brief(name)}"
        raise UnsafeFileError(f"loading it would call {named}")
    return ALLOWED[(str(module), name)]


def _codecs_encode(text, encoding="utf-8") -> bytes:
    """``_codecs.encode(text, "latin1")``: how protocol-2 pickles write bytes (no other codec is looked up)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeFileError(f"loading it would call _codecs.encode with {safe_arrays.brief(encoding)}")
    return text.encode("latin-1")


def _empty_bytes(*args) -> bytes:
    """``bytes()``: how protocol-2 pickles write an empty bytes object (an empty array's data)."""
    if args:
        raise UnsafeFileError("loading it would call bytes with arguments")
    return b""


# The one allow-list of plain pickles: (module, name) -> what it may stand for. numpy's array and
# scalar reconstruction and dtypes (under the names numpy 1 and 2 write; the checked builders of
# byol_fast.weights.safe_arrays stand for them), OrderedDict, the str -> bytes encoding with which
# protocol-2 pickles write bytes (and empty bytes), what dill writes for an array, for a namedtuple
# class and for a built-in function (_dill_array, _dill_namedtuple, _dill_attribute: DeepMind's BYOL
# release was written with dill 0.3); and, as inert stand-ins of the same shape, never imported, the
# data-only classes of DeepMind's BYOL release (byol_fast.weights.importers.deepmind): its
# NamedTuples become namedtuples with their fields, Haiku's immutable mappings (rebuilt from a dict)
# dicts; the functions of DATA_FUNCTIONS as their names (FunctionName), whether written as
# ``getattr(class, name)`` or by qualified name; and a JAX array as the numpy array it holds.
ALLOWED = {
    **{tuple(name.rsplit(".", 1)): builder for name, builder in safe_arrays.GLOBALS.items()},
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _codecs_encode, **{(m, "bytes"): _empty_bytes for m in ("builtins", "__builtin__")},
    **{(m, n): f for m in ("dill._dill", "dill.dill")  # dill >= 0.3 / older
       for n, f in (("_create_array", _dill_array), ("_create_namedtuple", _dill_namedtuple),
                    ("_import_module", _dill_module), ("_get_attr", _dill_attribute))},
    ("byol.byol_experiment", "_ByolExperimentState"): collections.namedtuple(
        "_ByolExperimentState", ["online_params", "target_params", "online_state", "target_state", "opt_state"]),
    ("byol.utils.optimizers", "AddWeightDecayState"): collections.namedtuple("AddWeightDecayState", []),
    ("byol.utils.optimizers", "ScaleByLarsState"): collections.namedtuple("ScaleByLarsState", ["mu"]),
    ("optax._src.transform", "ScaleState"): collections.namedtuple("ScaleState", []),
    ("haiku._src.data_structures", "FlatMapping"): dict,
    ("haiku._src.data_structures", "frozendict"): dict,
    ("frozendict", "frozendict"): dict,
    **{tuple(name.rsplit(".", 1)): cls for name, cls in DATA_CLASSES.items()},
    ("builtins", "getattr"): _data_function,  # refuses all but DATA_FUNCTIONS (protocols 0-3 write those so)
    # the same functions as protocol 4 and later write them: module, then the qualified name
    **{(cls.rsplit(".", 1)[0], f"{cls.rsplit('.', 1)[1]}.{method}"): f for (cls, method), f in DATA_FUNCTIONS.items()},
    ("jax._src.array", "_reconstruct_array"): _jax_array,
}


# The objects whose state a file may set (pickle's BUILD): the numpy builders and the Unread stand-ins.
_BUILDABLE = (safe_arrays.ArraySpec, safe_arrays.DtypeSpec, Unread)


class ArrayUnpickler(pickle._Unpickler):
    """Unpickles numpy arrays in plain containers (and the stand-ins above) and refuses every other
    global. Python's own unpickler (not the C one) so that each opcode that acts on an object can be
    checked: BUILD sets state only on the builders and stand-ins (the C unpickler sets any attribute
    a file names on any object, the allow-listed classes and functions included, and a later file
    would read through what an earlier one changed); APPEND and SETITEM act on lists and dicts only."""

    allowed = ALLOWED

    def find_class(self, module: str, name: str):
        if self.proto < 3 and self.fix_imports:  # protocol 2 writes Python 2's module names
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafeFileError(f"loading it would call {module}.{name}") from None

    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        if type(inst) is collections.OrderedDict and isinstance(state, dict) and set(state) <= {"_metadata"} \
                and isinstance(state.get("_metadata", {}), dict):  # a state_dict's _metadata, nothing else
            self.stack.pop()
            inst.__dict__.update(state)
            return
        if not isinstance(inst, _BUILDABLE) or type(inst) is Unread:
            raise UnsafeFileError(f"setting the state of {named(inst)}")
        self.stack.pop()
        inst.__setstate__(state)

    def load_reduce(self) -> None:
        func, args = self.stack[-2], self.stack[-1]
        if isinstance(func, type) and func in _HASHING and isinstance(args, tuple) and args:
            # set(items), OrderedDict(pairs), ...: from a list or tuple whose items are checked here, or a
            # mapping or set already checked as it was built; never an array or tensor, which iterate
            # to items no check has seen
            items = args[0]
            if len(args) > 1 or type(items) not in _ITEM_SOURCES:
                raise UnsafeFileError(f"{named(func)} of {safe_arrays.brief(items)}")
            if type(items) in (list, tuple):
                if func not in (set, frozenset, collections.Counter):
                    if any(type(pair) not in (list, tuple) or len(pair) != 2 for pair in items):
                        raise UnsafeFileError(f"{named(func)} of items that are not pairs")
                    items = [pair[0] for pair in items]
                _check_keys(items)
        pickle._Unpickler.dispatch[pickle.REDUCE[0]](self)

    def _checked(name: str, kinds: tuple | None, where: int, keys=None):
        """The opcode ``name``, acting only on an object of ``kinds`` (at ``where`` on the stack, or
        0: below the last mark), and with ``keys(stack)``, the dict keys or set items it will hash,
        checked by :func:`_check_keys` (after a mark the stack holds just the marked items)."""
        opcode = getattr(pickle, name)[0]

        def load(self) -> None:
            target = self.stack[where] if where else self.metastack[-1][-1] if kinds else None
            if kinds and type(target) not in kinds:
                raise UnsafeFileError(f"{name} on {named(target)}")
            if keys:
                _check_keys(keys(self.stack))
            pickle._Unpickler.dispatch[opcode](self)
        return opcode, load

    _MAPPINGS = (dict, collections.OrderedDict, collections.Counter)
    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: load_build, pickle.REDUCE[0]: load_reduce, **dict((
        _checked("APPEND", (list,), -2), _checked("APPENDS", (list,), 0),
        _checked("SETITEM", _MAPPINGS, -3, lambda stack: stack[-2:-1]),
        _checked("SETITEMS", _MAPPINGS, 0, lambda stack: stack[::2]),
        _checked("ADDITEMS", (set,), 0, lambda stack: stack),
        _checked("FROZENSET", None, 0, lambda stack: stack), _checked("DICT", None, 0, lambda stack: stack[::2])))}
    del _checked, _MAPPINGS


# What hashes the items it is given (dict keys, set items): a file's nested tuples must not reach it.
_HASHING = {set, frozenset, dict, collections.OrderedDict, collections.Counter}


_SCALARS = (str, bytes, int, float, bool, complex, type(None))


_ITEM_SOURCES = (list, tuple, dict, collections.OrderedDict, collections.Counter, set, frozenset)


MAX_KEY_BITS = 256  # an int's hash is not cached: a huge int key rehashed at every reference


def _check_keys(keys) -> None:
    """Dict keys and set items: scalars, or short tuples of scalars. A tuple's hash walks all of it,
    uncached, and with the memo a few KB of pickle nest tuples to 10**30 elements."""
    for key in keys:
        parts = key if type(key) is tuple and len(key) <= 16 else (key,)
        if not all(type(part) in _SCALARS and (type(part) is not int or part.bit_length() <= MAX_KEY_BITS)
                   for part in parts):
            raise UnsafeFileError(f"a dict key or set item of {safe_arrays.brief(key)}")


def named(obj) -> str:
    return getattr(obj, "__qualname__", None) or f"a {type(obj).__qualname__} object"
