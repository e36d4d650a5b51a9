"""The checkpoint formats, written and read here, and how they reach the disk.

Three kinds of file, each tagged with its kind when written and told apart by it when read:

- :data:`PRETRAIN` (``runs/x/last.pt``): online and target networks, predictor, optimizer, step,
  RNG and loader states, the config; a top-level ``"kind"`` entry;
- :data:`LINEAR` (``runs/x/linear/last.pt``): the frozen encoder, the classifier, its optimizer,
  the epoch and the results so far; a top-level ``"kind"`` entry;
- :data:`ENCODER` (``python -m byol_fast.export``): a plain torchvision state_dict. Its tag (and the
  input normalisation) sits in the state_dict's own ``_metadata`` (where PyTorch keeps per-module
  versions), so ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` still sees
  nothing but tensors and reports only ``fc.*`` missing; as ``.safetensors``, in its string metadata.

Pretraining files written before the tags existed are recognised by their keys.

Every file is written to a temporary file in the same folder, flushed to disk and renamed over the
old one, so a crash (even kill -9) mid-write leaves the previous file intact. :class:`BackgroundWriter`
does the same off the training loop's critical path: it pauses the caller only to copy the state
into host memory it owns, and writes that copy in a thread.
"""
from __future__ import annotations

import atexit
import collections
import copy
import json
import os
import random
import shutil
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from byol_fast.errors import CheckpointError
from byol_fast.weights import checkpoint_schema, safe_load

LAST = "last.pt"
PRETRAIN = "byol_fast.pretrain"
LINEAR = "byol_fast.linear_eval"
ENCODER = "byol_fast.encoder"


def _write_file(obj, f) -> None:
    """The bytes of a checkpoint into the open file ``f``: the one place they are produced (a test
    replaces it to cut a write short and kill the process mid-file)."""
    torch.save(obj, f)


def _failed_write(e: BaseException) -> bool:
    """Whether ``e`` is the disk refusing a write (full, read-only, gone) rather than a bug: an OSError,
    or torch's archive writer reporting a short write as a RuntimeError without the errno."""
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("PytorchStreamWriter failed", "unexpected pos", "file write failed")))


def _first_line(e: BaseException) -> str:
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return (text.strip().splitlines() or [type(e).__name__])[0][:200]


def atomic_save(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            _write_file(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, an unpicklable entry: give the space back, keep the old file
        tmp.unlink(missing_ok=True)
        if _failed_write(e):
            free = shutil.disk_usage(path.parent).free / 1024 ** 3
            raise CheckpointError(f"{path}: could not be written ({_first_line(e)}; {free:.2f} GB free on its "
                                  f"disk); the previous checkpoint there is kept") from None
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def save(state: dict, path: str | Path, kind: str) -> None:
    """Write a pretraining or linear-evaluation checkpoint, tagged with its ``kind``."""
    atomic_save({"kind": kind, **state}, path)


class BackgroundWriter:
    """Snapshots a state at the step boundary and writes it in a background thread.

    ``checkpoint.save`` in the training loop stops training for the whole serialisation, write and
    fsync of the file, which grows with the state's size and the filesystem's speed (longest on a
    slow or network filesystem; benchmarks/checkpoint_pause.py measures it). :meth:`save` stops it
    only for a copy of every tensor into host buffers this writer owns, then a thread does what
    ``checkpoint.save`` does with that copy (tag, temporary file, fsync, rename), so the file is the
    one a synchronous save at the same step would write and a kill -9 at any moment still leaves the
    previous file whole.

    - The copy is needed because training mutates its tensors in place (weights, momentum, BN
      statistics, the step counters of the optimizer): a file written from the live tensors would mix
      steps. It is a deep copy of every tensor in nested dicts, lists and tuples; numpy arrays and
      other mutable leaves are copied, immutable ones (numbers, strings, bytes) kept.
    - CUDA tensors go to pinned buffers with non-blocking copies on their device's current stream and
      one synchronize per device: the copies queue behind the step's kernels, so they see the weights
      after the step, and the pause is one D2H transfer at pinned-memory bandwidth. (Work on side
      streams must be complete, as for a synchronous save.) The file then holds CPU tensors;
      ``load`` maps to the CPU anyway.
    - Buffers are kept and reused from one save to the next while a tensor's shape, strides and
      dtype stay the same, for CPU tensors too: pinned memory is slow to allocate, and fresh pages
      are faulted in one by one on first touch, which costs more than the copy itself (the first save
      pauses the loop about ten times longer than the later ones, which reuse the buffers).
      The price is one host copy of the state held between saves.
    - One write at a time: a save waits for the previous write, so buffers are never overwritten
      while being written and files reach the disk in the order they were saved.
    - Errors of a write (a full disk, an unwritable folder) are the exception ``checkpoint.save``
      would have raised, re-raised once by the next :meth:`wait`, :meth:`save` or :meth:`close`;
      one never collected is printed to stderr at exit or when the writer is garbage-collected.
    - Each write runs in its own non-daemon thread, which ends with it: a process that returns from
      ``main`` with a write in flight (a save on SIGTERM, say) finishes the file before it exits, and
      an idle writer holds no thread that would keep the interpreter from exiting.

    Meant to be driven from one thread (the training loop's). A synchronous ``checkpoint.save`` of
    the same path from the same process must come after :meth:`wait`: both use the same temporary
    file name.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}  # position in the state -> host buffer
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False
        _WRITERS.add(self)

    def save(self, state: dict, path: Path, kind: str, on_done: Callable[[], None] | None = None) -> float:
        """Wait for the previous write (its error, if any, is raised here and this state is not
        saved: call again), snapshot ``state``, start writing it to ``path`` tagged with ``kind``,
        and return the seconds the caller was paused (the wait, if the previous write was still
        running, plus the snapshot). Once this returns ``state`` may change freely. ``on_done`` is
        called by the writing thread once the file is in place (a log line, say)."""
        if self._closed:
            raise RuntimeError("BackgroundWriter.save after close()")
        start = time.perf_counter()
        self.wait()
        snapshot = self._snapshot(state)
        self._thread = threading.Thread(target=self._write, args=(snapshot, Path(path), kind, on_done),
                                        name="checkpoint-writer", daemon=False)
        self._thread.start()
        return time.perf_counter() - start

    def wait(self) -> None:
        """Return once the last write is on disk (renamed into place); re-raise, once, its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Wait for the last write (raising its error), then refuse further saves; idempotent."""
        try:
            self.wait()
        finally:
            self._closed = True
            self._buffers = {}

    @property
    def busy(self) -> bool:
        """A write is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def _write(self, snapshot: dict, path: Path, kind: str, on_done: Callable[[], None] | None) -> None:
        try:
            save(snapshot, path, kind)
            if on_done is not None:
                on_done()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, raised there
            if hasattr(e, "add_note"):
                e.add_note(f"(raised by the background write of {path})")
            self._error = e

    def _snapshot(self, state: dict) -> dict:
        """A deep copy of ``state`` whose tensors live in this writer's host buffers."""
        buffers, streams = {}, {}
        memo: dict[int, object] = {}  # id of a tensor -> its copy: a tensor twice in the state stays one
        # One intra-op thread for the host copies: they are bound by memory bandwidth, which one core
        # nearly saturates, and a parallel copy waits at every tensor for its slowest thread, so on
        # cores shared with loader workers it stalls (there, several times slower than one thread;
        # on idle cores both take the same time).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                snapshot = self._copy(state, (), buffers, streams, memo)
                for stream in streams.values():  # the non-blocking D2H copies
                    stream.synchronize()
        finally:
            torch.set_num_threads(threads)
        self._buffers = buffers  # positions no longer in the state drop their buffers
        return snapshot

    def _copy(self, obj, key: tuple, buffers: dict, streams: dict, memo: dict):
        if isinstance(obj, torch.Tensor):
            if id(obj) not in memo:
                memo[id(obj)] = self._copy_tensor(obj, key, buffers, streams)
            return memo[id(obj)]
        if obj is None or isinstance(obj, _IMMUTABLE):
            return obj
        if isinstance(obj, np.ndarray):
            return obj.copy(order="K")
        if type(obj) is dict:
            return {k: self._copy(v, key + (k,), buffers, streams, memo) for k, v in obj.items()}
        if type(obj) in (list, tuple):
            return type(obj)(self._copy(v, key + (i,), buffers, streams, memo) for i, v in enumerate(obj))
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
            return type(obj)(*(self._copy(v, key + (i,), buffers, streams, memo) for i, v in enumerate(obj)))
        if isinstance(obj, dict):  # OrderedDict (a module's state_dict, its _metadata attribute kept) and kin
            out = copy.copy(obj)
            for k, v in obj.items():
                out[k] = self._copy(v, key + (k,), buffers, streams, memo)
            if getattr(obj, "__dict__", None):
                out.__dict__.update(copy.deepcopy(obj.__dict__))
            return out
        return copy.deepcopy(obj)  # anything else (sets, bytearrays, ...): rare and small

    def _copy_tensor(self, t: torch.Tensor, key: tuple, buffers: dict, streams: dict) -> torch.Tensor:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided or t.is_quantized \
                or t.device.type not in ("cpu", "cuda"):
            return t.detach().clone()  # sparse, quantized, meta, subclasses: rare, copied where they are
        on_cuda = t.device.type == "cuda"
        # Keep the tensor's memory format (channels_last weights) when it is dense, as torch.save would.
        dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)) \
            or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))
        stride = t.stride() if dense else torch.empty(t.shape, device="meta").stride()
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.stride() != stride or buf.dtype != t.dtype \
                or buf.is_pinned() != on_cuda or key in buffers:
            buf = torch.empty_strided(t.shape, stride, dtype=t.dtype, device="cpu", pin_memory=on_cuda)
        buffers[key] = buf
        buf.copy_(t.detach(), non_blocking=on_cuda)
        if on_cuda and t.device not in streams:
            streams[t.device] = torch.cuda.current_stream(t.device)
        if isinstance(t, torch.nn.Parameter):
            return torch.nn.Parameter(buf, requires_grad=t.requires_grad)
        return buf.detach().requires_grad_() if t.requires_grad else buf

    def __del__(self) -> None:
        if getattr(self, "_error", None) is not None:  # (checked first: at shutdown globals may be gone)
            _report_unraised(self)


# Leaves a snapshot can share with the live state: nothing can change them in place.
_IMMUTABLE = (bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size, np.generic)

_WRITERS: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()


def _report_unraised(writer: BackgroundWriter) -> None:
    """An error of a write that no wait() collected: say so on stderr rather than lose it."""
    error, writer._error = getattr(writer, "_error", None), None
    if error is not None and sys.stderr is not None:
        print(f"error: a background checkpoint write failed and was never reported: "
              f"{type(error).__name__}: {error}", file=sys.stderr)


@atexit.register
def _report_unraised_at_exit() -> None:
    # atexit runs after the interpreter joined the non-daemon write threads: every write has ended.
    for writer in list(_WRITERS):
        _report_unraised(writer)


def save_encoder(state_dict: dict, path: str | Path, mean, std, padding: str = "torchvision") -> None:
    """Write an exported encoder: a torchvision state_dict whose ``_metadata`` carries the tag, the
    input normalisation (``mean``/``std`` on [0, 1] pixels) it was trained with and its padding
    ("same" for an encoder converted from TensorFlow/Haiku, see byol_fast.models.resnet)."""
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        meta[""] = {**meta.get("", {}), **_encoder_tag(mean, std, padding)}
    atomic_save(state_dict, path)


def save_encoder_safetensors(state_dict: dict, path: str | Path, mean, std, padding: str = "torchvision") -> None:
    """The same encoder as a safetensors file (tensors and a string map, never code), tagged alike."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in _encoder_tag(mean, std, padding).items()})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as any file this process writes (safetensors makes it private)
    os.replace(tmp, path)


def _encoder_tag(mean, std, padding: str) -> dict:
    return {"kind": ENCODER, "mean": [float(m) for m in mean], "std": [float(s) for s in std], "padding": padding}


def encoder_tag(obj: dict) -> dict:
    """What an exported encoder was tagged with (kind, mean, std, padding), or {} for a foreign state_dict."""
    meta = getattr(obj, "_metadata", None)
    tag = meta.get("") if isinstance(meta, dict) else None
    return tag if isinstance(tag, dict) and type(tag.get("kind")) is str and tag["kind"] == ENCODER else {}


def _read_safetensors(path: Path) -> dict:
    """A safetensors file as a state_dict, its tag (if ours) put where save_encoder puts it."""
    from safetensors import safe_open

    state = collections.OrderedDict()
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            state[key] = f.get_tensor(key)
        meta = f.metadata() or {}
    if meta.get("kind") == json.dumps(ENCODER):
        state._metadata = {"": {k: json.loads(v) for k, v in meta.items() if k in ("kind", "mean", "std", "padding")}}
    return state


def kind_of(obj: dict) -> str | None:
    """The kind of a loaded file: PRETRAIN, LINEAR, ENCODER, or None (e.g. a foreign state_dict)."""
    kind = obj.get("kind")
    if type(kind) is str and kind in (PRETRAIN, LINEAR):  # a file's "kind" may be anything: an array too
        return kind
    if "online" in obj and "config" in obj:  # a pretraining checkpoint from before the tags
        return PRETRAIN
    return ENCODER if encoder_tag(obj) else None


def load(path: str | Path, kind: str | None = None, map_location="cpu") -> dict:
    """The dict in ``path``; with ``kind``, a CheckpointError unless the file is of that kind.

    Every way a file can fail to be one is a CheckpointError naming the file, in one line: missing,
    unreadable, refused by the readers (it would run code or blow up in memory), not a file these
    readers understand (text, a .npy, a torn or empty file), not a dict, not of ``kind``, or one of
    our kinds with a field of the wrong type or shape (:mod:`byol_fast.weights.checkpoint_schema`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:  # neither reader runs code from the file
        state = _read_safetensors(path) if path.suffix == ".safetensors" else safe_load.read(path, map_location)
    except safe_load.UnsafeFileError as e:  # (a ValueError: caught before the readers' own errors)
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it: {e.strerror or e}") from None
    except (*safe_load.READ_ERRORS, _safetensors_error()) as e:
        raise CheckpointError(f"{path}: not a checkpoint byol_fast can read (a torch file, a pickle of arrays "
                              f"or a safetensors file): {_what_went_wrong(path, e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a byol_fast checkpoint (found {type(state).__name__})")
    if kind is not None and kind_of(state) != kind:
        raise CheckpointError(f"{path} is not a {kind} checkpoint (it is {kind_of(state) or 'of no byol_fast kind'})")
    check_fields(state, path)
    return state


def check_fields(state: dict, path: str | Path) -> None:
    """CheckpointError naming ``path`` and the field unless ``state``, if of one of our kinds, holds
    each field in the type and shape its kind's schema (byol_fast.weights.checkpoint_schema) says."""
    kind, tag = kind_of(state), state.get("kind")
    if type(tag) is str and tag.startswith("byol_fast.") and tag not in (PRETRAIN, LINEAR):
        raise CheckpointError(f"{path}: kind: {tag[:60]!r} is no kind of file this version of byol_fast reads "
                              f"({PRETRAIN}, {LINEAR})")
    if kind == PRETRAIN:
        checkpoint_schema.check(state, path, checkpoint_schema.PRETRAIN, what="pretraining checkpoint")
    elif kind == LINEAR:
        checkpoint_schema.check(state, path, checkpoint_schema.LINEAR, checkpoint_schema.LINEAR_REQUIRED,
                                what="linear-evaluation checkpoint")
    elif kind == ENCODER:
        checkpoint_schema.check({"state_dict": state}, path, {"state_dict": checkpoint_schema.state_dict})
        checkpoint_schema.check(encoder_tag(state), path, checkpoint_schema.ENCODER_TAG, where="tag")


def _safetensors_error() -> type[Exception]:
    from safetensors import SafetensorError

    return SafetensorError


def _what_went_wrong(path: Path, error: BaseException) -> str:
    """A reader's error in a few words: what a user can act on, never a traceback or a page of text."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive cut short or damaged (its directory cannot be read)"
    if head.startswith(b"\x93NUMPY"):
        return "a numpy .npy array (byol_fast reads arrays pickled in a dict, e.g. by torch.save)"
    if head.isascii() and all(c >= 32 or c in b"\t\n\r" for c in head):
        return "it looks like text"
    if isinstance(error, EOFError):
        return "it ends before its data does (a file cut short?)"
    if isinstance(error, (MemoryError, RecursionError)):
        return f"reading it ran out of {'memory' if isinstance(error, MemoryError) else 'stack'}"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:120]}{'...' if len(text) > 120 else ''}" if text else type(error).__name__


def rng_state() -> dict:
    """Every generator's state as numbers, strings and tensors, so that the file loads with
    ``torch.load(weights_only=True)`` alone (numpy's key array becomes an int64 tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


