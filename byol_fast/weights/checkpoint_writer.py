"""Checkpoints written off the training loop's critical path: a snapshot at the step boundary, the
file written by a background thread exactly as a synchronous ``checkpoint.save`` would write it."""
from __future__ import annotations

import atexit
import copy
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from byol_fast.weights.checkpoint import save


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
