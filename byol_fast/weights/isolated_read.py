"""Reading a pickle-based file a user points at, first in a child process that cannot hurt this one.

The readers of :mod:`byol_fast.weights.safe_load` never run code from a file, and keep each read
within budgets of their own (array bytes, storages, namedtuple classes, hashed keys). What they
cannot promise by construction is that nothing a crafted file makes, in their code or in torch's,
takes unbounded time or memory. So :func:`read` first reads the file in a child process, forked
by a server of its own (``python -m byol_fast.weights.isolated_read``: its own interpreter, one
thread, started once per process, so no thread, device or main module of the caller is copied),
under limits the kernel enforces: address space (a multiple of the file's size plus a margin), CPU time and wall time. The
child also walks what it read as a tree, each object counted once per path to it, so a file whose
objects are shared into a structure astronomically larger than the file (a few KB of pickle nest
lists to 2**60 leaves) is refused before any code of this process walks, formats or compares it.

The child sends back one short JSON verdict, never a pickle. When the reader refused the file or
failed on it, that error is raised here, the same class with the same message. Only when the child
read it whole within its limits does this process read the file itself (the same deterministic
reader, now known to finish within those limits), and keeps what it read only if the file is the
same one (device, inode, size and modification time unchanged).
"""
from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from byol_fast.weights import safe_load
from byol_fast.weights.unpickler import Unread, UnsafeFileError

# The child's limits: wall and CPU seconds of a read, and its memory (address space beyond what the
# child has mapped when it starts), each a base plus a share of the file's size.
BASE_SECONDS, SECONDS_PER_GB = 120.0, 60.0
BASE_MEMORY, MEMORY_PER_FILE_BYTE = 2 << 30, 4
MAX_NODES = 10_000_000  # objects of the file's tree, counted once per path to them


def limits_for(size: int) -> tuple[float, int]:
    """(seconds, bytes of memory) the child may use to read a file of ``size`` bytes."""
    return BASE_SECONDS + SECONDS_PER_GB * size / 2**30, BASE_MEMORY + MEMORY_PER_FILE_BYTE * size


def read(path: str | Path, map_location="cpu", seconds: float | None = None, memory: int | None = None,
         nodes: int = MAX_NODES):
    """The object in ``path``, as :func:`safe_load.read` returns it, once a child process has read
    the same file within ``seconds`` and ``memory`` (default :func:`limits_for`) and found at most
    ``nodes`` objects in it, counted as a tree (:func:`count_nodes`).

    The reader's own errors (:data:`safe_load.READ_ERRORS`, UnsafeFileError) come from the child's
    read, raised here as the same class with the same message. Raises UnsafeFileError naming the file
    when the child ran out of time or memory, was ended by a signal, found the file's objects too
    many, or the file changed between the two reads."""
    path = Path(path)
    before = _identity(path)
    default_seconds, default_memory = limits_for(before[2])
    _dry_run(path, default_seconds if seconds is None else seconds, default_memory if memory is None else memory,
             nodes)
    obj = safe_load.read(path, map_location)
    if _identity(path) != before:
        raise UnsafeFileError(f"{path}: refused: it changed while it was read")
    return obj


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class _Server:
    """``python -m byol_fast.weights.isolated_read``, started once per process: it imports the readers
    (and torch) once, then forks one child per file. Its own process, single-threaded, so a fork
    copies no thread, lock or device of a run, and nothing of the caller's main module. Each request
    carries a number its answer repeats, so an answer left unread (a read interrupted) is skipped."""

    lock = threading.Lock()
    proc: subprocess.Popen | None = None
    owner = 0  # the process that started proc: a forked copy of the caller starts its own
    asked = 0

    @classmethod
    def ask(cls, request: dict, timeout: float) -> list:
        with cls.lock:
            for _ in (0, 1):
                if cls.proc is None or cls.owner != os.getpid() or cls.proc.poll() is not None:
                    cls.proc, cls.owner = cls._start(), os.getpid()
                cls.asked += 1
                deadline = time.monotonic() + timeout
                answer = cls._exchange({**request, "id": cls.asked}, deadline)
                if answer is not None:
                    return answer
                cls.proc.kill()  # it died or outlasted the wall time: a fresh one for the next read
                cls.proc.wait()
                cls.proc = None
                if time.monotonic() >= deadline:
                    return ["limit", f"reading it took more than {request['seconds']:.0f} s"]
            return ["limit", "the process reading it ended without an answer"]

    @classmethod
    def _exchange(cls, request: dict, deadline: float) -> list | None:
        """The answer to ``request``; None when the server ended or the deadline passed."""
        try:
            cls.proc.stdin.write(json.dumps(request) + "\n")
            cls.proc.stdin.flush()
            while True:
                ready, _, _ = select.select([cls.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
                line = cls.proc.stdout.readline() if ready else ""
                if not line:
                    return None
                answer = json.loads(line)
                if answer.get("id") == request["id"]:
                    return answer["verdict"]
        except (OSError, ValueError):
            return None

    @staticmethod
    def _start() -> subprocess.Popen:
        root = str(Path(__file__).resolve().parents[2])  # the folder holding byol_fast
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "OMP_NUM_THREADS": "1"}
        return subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env, text=True, bufsize=1)


def _dry_run(path: Path, seconds: float, memory: int, nodes: int) -> None:
    """Returns when the child read ``path`` within the limits; raises the reader's error it met, or
    UnsafeFileError for a limit it reached."""
    verdict = _Server.ask({"path": str(path), "seconds": seconds, "memory": memory, "nodes": nodes}, seconds + 30)
    kind, detail = verdict[0], verdict[1]
    if kind == "read":
        return
    if kind == "memory":
        detail = f"reading it needs more than {memory / 2**30:.1f} GB of memory"
    if kind in ("limit", "memory"):
        raise UnsafeFileError(f"{path}: refused: {detail}; byol_fast reads only files that read within "
                              "bounded time and memory")
    if kind == "unsafe":
        raise UnsafeFileError(detail)
    raise _ERRORS.get(verdict[2], RuntimeError)(detail)  # "error": the reader's own


# The reader's errors by name, to raise in this process the one the child met.
_ERRORS = {cls.__name__: cls for cls in (*safe_load.READ_ERRORS, KeyError, IndexError, UnicodeError)}


def serve() -> None:
    """The server: one JSON request a line on stdin, one JSON verdict a line on stdout, a forked
    child per request, killed when it outlasts its wall time."""
    for line in sys.stdin:
        request = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(read_end)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stdout is the server's answers: never the child's
            try:
                verdict = _child(request["path"], request["seconds"], request["memory"], request["nodes"])
            except BaseException:  # noqa: BLE001  whatever it was, the answer is that it failed
                verdict = ["limit", "the process reading it failed"]
            os.write(write_end, json.dumps(verdict).encode())
            os._exit(0)
        os.close(write_end)
        verdict = _outcome(pid, read_end, request["seconds"])
        sys.stdout.write(json.dumps({"id": request["id"], "verdict": verdict}) + "\n")
        sys.stdout.flush()


def _outcome(pid: int, read_end: int, seconds: float) -> list:
    """The child's verdict, or what ended it: out of CPU time, a signal, or the wall time (killed)."""
    chunks, deadline = [], time.monotonic() + seconds + 10
    with os.fdopen(read_end, "rb") as pipe:
        while True:
            ready, _, _ = select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return ["limit", f"reading it took more than {seconds:.0f} s"]
            chunk = os.read(pipe.fileno(), 65536)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if chunks:
        try:
            return json.loads(b"".join(chunks))
        except ValueError:  # cut short while it answered: what ended it says why
            pass
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU:
        return ["limit", f"reading it took more than {seconds:.0f} s of CPU time"]
    why = f"signal {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status) else \
        f"exit status {os.WEXITSTATUS(status)}"
    return ["limit", f"the process reading it ended by {why}"]


def _child(path: str, seconds: float, memory: int, nodes: int) -> list:
    """In the child: limits, the read, the walk; its verdict."""
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (mapped + memory, resource.RLIM_INFINITY))
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(used.ru_utime + used.ru_stime + seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    try:
        obj = safe_load.read(path, "cpu")
        try:
            count_nodes(obj, nodes)
        except UnsafeFileError as e:
            raise UnsafeFileError(f"{path}: refused: {e}") from None
        return ["read", ""]
    except MemoryError:
        return ["memory", ""]
    except UnsafeFileError as e:
        return ["unsafe", str(e)]
    except OSError:
        return ["read", ""]  # a file the caller cannot read either: it says so itself
    except safe_load.READ_ERRORS as e:
        text = str(e)
        if isinstance(e, RuntimeError) and "allocate" in text:  # torch's allocator, out of memory
            return ["memory", ""]
        name = next(c.__name__ for c in type(e).__mro__ if c.__name__ in _ERRORS)
        return ["error", text[:4000], name]


def count_nodes(obj, limit: int = MAX_NODES) -> int:
    """The objects of ``obj`` as a tree (containers, their items, an Unread stand-in's state), each
    counted once per path to it; UnsafeFileError past ``limit``."""
    stack, count = [obj], 0
    while stack:
        item = stack.pop()
        count += 1
        if count > limit:
            raise UnsafeFileError(f"its objects, counted as a tree, are over {limit:,} (shared many times over)")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, Unread):
            stack.append(item.__dict__.get("state"))
    return count


if __name__ == "__main__":
    serve()
