"""checkpoint_writer.BackgroundWriter: the file it writes in its thread is the file a synchronous
checkpoint.save of the state at save() time writes, whatever the caller does to the state afterwards;
its errors are the synchronous save's, raised once; kill -9 mid-write leaves the previous file whole.

Every check compares file contents with values taken independently (a synchronous save, or a deep
copy made before save()); none measures time (benchmarks/checkpoint_pause.py does)."""
import collections
import copy
import errno
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import CHILD_ENV, ROOT

from byol_fast.errors import CheckpointError
from byol_fast.weights import checkpoint as ckpt
from byol_fast.weights.checkpoint_writer import BackgroundWriter


def training_state(seed: int = 0) -> dict:
    """What a pretraining checkpoint holds, in small: module state_dicts (OrderedDicts with
    _metadata, BN running stats and int64 counters, channels_last weights), optimizer states
    (momentum buffers, Adam's step tensors), RNG states, numbers, strings, bytes, numpy arrays."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 5)).to(memory_format=torch.channels_last)
    head = torch.nn.Linear(5, 3)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(head.parameters(), lr=0.1)
    for _ in range(2):
        loss = head(net(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last))).square().mean()
        loss.backward()
        sgd.step()
        adam.step()
    shared = torch.randn(6)
    return {"step": 7, "online": net.state_dict(), "head": head.state_dict(), "optimizer": sgd.state_dict(),
            "head_optimizer": adam.state_dict(), "rng": ckpt.rng_state(), "config": {"lr": 0.1, "name": "x"},
            "git": "abc123", "blob": b"\x00\x01", "array": np.arange(5, dtype=np.float32),
            "param": torch.nn.Parameter(torch.randn(3)), "shared": [shared, shared], "ints": torch.arange(4),
            "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 3), "view": torch.randn(3, 4).t(),
            "loader": [{"epoch": 1, "position": torch.tensor([3, 4])}], "pair": (1, torch.ones(2))}


def tensors(obj):
    """Every tensor in a nested state, each once."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def mutate(state: dict) -> None:
    """What training does after a save: every tensor and array changed in place, containers edited."""
    with torch.no_grad():
        for t in {id(t): t for t in tensors(state)}.values():
            if t.dtype == torch.bool:
                t.logical_not_()
            else:
                t.add_(1)
    state["array"] += 1
    state["config"]["lr"] = 99.0
    state["loader"].append("more")
    state["step"] += 1


def assert_same(a, b, where="state") -> None:
    """Equal, tensors exactly (dtype, shape, values, Parameter-ness); containers of the same kind."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape, type(a)) == (b.dtype, b.shape, type(b)), where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b), where
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    else:
        assert a == b, where


@pytest.fixture
def gated(monkeypatch):
    """Writes held back until the test opens the gate: what the caller does meanwhile is certain to
    happen before a single byte is serialised."""
    gate = threading.Event()
    write = ckpt._write_file

    def held(obj, f):
        assert gate.wait(30), "gate never opened"
        write(obj, f)

    monkeypatch.setattr(ckpt, "_write_file", held)
    return gate


def test_the_file_equals_a_synchronous_save_of_the_same_state(tmp_path):
    state = training_state()
    ckpt.save(state, tmp_path / "sync.pt", ckpt.PRETRAIN)
    writer = BackgroundWriter()
    pause = writer.save(state, tmp_path / "bg.pt", ckpt.PRETRAIN)
    writer.close()
    assert isinstance(pause, float) and not writer.busy
    sync, bg = ckpt.load(tmp_path / "sync.pt", ckpt.PRETRAIN), ckpt.load(tmp_path / "bg.pt", ckpt.PRETRAIN)
    assert_same(sync, bg)
    assert_same({"kind": ckpt.PRETRAIN, **state}, bg)
    assert bg["shared"][0] is bg["shared"][1]  # one tensor twice in the state: one tensor twice in the file
    assert bg["online"]["0.weight"].is_contiguous(memory_format=torch.channels_last)
    assert not any(tmp_path.glob(".*.tmp"))


def test_changes_after_save_returns_never_reach_the_file(tmp_path, gated):
    """Three saves through one writer (its buffers reused, then reallocated for a new shape), the
    state mutated in place right after each save() returns and before its write begins."""
    state = training_state()
    writer = BackgroundWriter()
    for i in range(3):
        if i == 2:
            state["online"]["3.weight"] = torch.randn(5, 7)  # other shapes at the same places,
            state["ints"] = torch.arange(1)  # one that a buffer of the old shape would take by broadcasting
            state["new"] = torch.randn(2)
        expected = copy.deepcopy(state)
        writer.save(state, tmp_path / f"{i}.pt", ckpt.PRETRAIN)
        assert writer.busy
        mutate(state)
        gated.set()
        writer.wait()
        gated.clear()
        assert_same({"kind": ckpt.PRETRAIN, **expected}, ckpt.load(tmp_path / f"{i}.pt", ckpt.PRETRAIN), f"save {i}")
    writer.close()


def test_a_save_waits_for_the_previous_write(tmp_path, gated):
    writer = BackgroundWriter()
    writer.save({"step": 1}, tmp_path / "a.pt", ckpt.PRETRAIN)
    second = threading.Thread(target=writer.save, args=({"step": 2}, tmp_path / "b.pt", ckpt.PRETRAIN))
    second.start()
    second.join(0.5)
    assert second.is_alive() and not (tmp_path / "a.pt").exists()  # blocked behind the first write
    gated.set()
    second.join(30)
    writer.close()
    assert ckpt.load(tmp_path / "a.pt")["step"] == 1 and ckpt.load(tmp_path / "b.pt")["step"] == 2


def unwritable(tmp_path):
    """A checkpoint path whose folder cannot be made (a file stands there; chmod does not stop root)."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    return blocker / "run" / "last.pt"


def test_a_write_error_is_the_synchronous_error_raised_once_by_wait(tmp_path):
    state, bad = training_state(), unwritable(tmp_path)
    with pytest.raises(OSError) as sync:
        ckpt.save(state, bad, ckpt.PRETRAIN)
    writer = BackgroundWriter()
    writer.save(state, bad, ckpt.PRETRAIN)  # the error belongs to the write, not to the snapshot
    with pytest.raises(type(sync.value)) as background:
        writer.wait()
    assert (background.value.errno, background.value.filename) == (sync.value.errno, sync.value.filename)
    writer.wait()  # raised once: not again
    writer.close()


def test_a_write_error_surfaces_at_the_next_save_which_can_then_be_retried(tmp_path):
    writer = BackgroundWriter()
    writer.save({"step": 1}, unwritable(tmp_path), ckpt.PRETRAIN)
    good = tmp_path / "last.pt"
    with pytest.raises(OSError):
        writer.save({"step": 2}, good, ckpt.PRETRAIN)
    assert not writer.busy and not good.exists()  # the state of the failed call was not saved
    writer.save({"step": 2}, good, ckpt.PRETRAIN)
    writer.close()
    assert ckpt.load(good, ckpt.PRETRAIN)["step"] == 2


def test_a_write_error_surfaces_at_close_once_and_close_is_idempotent(tmp_path):
    writer = BackgroundWriter()
    writer.save({"step": 1}, unwritable(tmp_path), ckpt.PRETRAIN)
    with pytest.raises(OSError):
        writer.close()
    writer.close()
    with pytest.raises(RuntimeError, match="after close"):
        writer.save({"step": 2}, tmp_path / "x.pt", ckpt.PRETRAIN)


def test_a_full_disk_mid_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    writer = BackgroundWriter()
    writer.save({"step": 1, "w": torch.ones(3)}, path, ckpt.PRETRAIN)
    writer.wait()

    def disk_full(obj, f):
        f.write(b"PK\x03\x04 part of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def torch_short_write(obj, f):  # how torch's archive writer reports the same (no errno)
        f.write(b"PK\x03\x04 part of a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1088 vs 1024")

    for failure in (disk_full, torch_short_write):
        monkeypatch.setattr(ckpt, "_write_file", failure)
        writer.save({"step": 2, "w": torch.zeros(3)}, path, ckpt.PRETRAIN)
        with pytest.raises(CheckpointError, match=r"last\.pt: could not be written \((No space left on device|"
                           r"\[enforce fail.*unexpected pos 1088 vs 1024); .* GB free on its disk\); the previous "
                           r"checkpoint there is kept"):
            writer.wait()
        assert ckpt.load(path, ckpt.PRETRAIN)["step"] == 1 and not any(tmp_path.glob(".*.tmp"))
    monkeypatch.setattr(ckpt, "_write_file", lambda obj, f: 1 / 0)  # a bug is not reported as the disk
    writer.save({"step": 3, "w": torch.zeros(3)}, path, ckpt.PRETRAIN)
    with pytest.raises(ZeroDivisionError):
        writer.wait()


# The child of the kill test: a first checkpoint written and waited for, then a second, 64 MB one
# whose write stops once 4 MB of the temporary file are on the disk, where the process
# kills itself (kill -9: no handler, no finally, no atexit runs) while the main thread computes on.
KILLED_CHILD = """
import os, signal, sys, time
import torch
from byol_fast.weights import checkpoint as ckpt
from byol_fast.weights.checkpoint_writer import BackgroundWriter

path = sys.argv[1]
writer = BackgroundWriter()
writer.save({"step": 1, "w": torch.arange(1000, dtype=torch.float32)}, path, ckpt.PRETRAIN)
writer.wait()

class Dying:
    def __init__(self, f):
        self.f, self.written = f, 0
    def write(self, data):
        room = (4 << 20) - self.written
        if len(data) > room:  # the tensor's bytes: write their first part, then die
            self.f.write(memoryview(data).cast("B")[:room])
            self.f.flush()
            os.fsync(self.f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        n = self.f.write(data)
        self.written += n
        return n
    def flush(self):
        self.f.flush()

write = ckpt._write_file
ckpt._write_file = lambda obj, f: write(obj, Dying(f))
writer.save({"step": 2, "w": torch.full((16 << 20,), 2.0)}, path, ckpt.PRETRAIN)
print("writing", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:  # training goes on meanwhile
    torch.randn(256, 256) @ torch.randn(256, 256)
sys.exit(3)
"""


def test_kill_9_mid_write_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "last.pt"
    res = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(path)], env=CHILD_ENV, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert "writing" in res.stdout
    state = ckpt.load(path, ckpt.PRETRAIN)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(1000, dtype=torch.float32))
    torn = list(tmp_path.glob(f".{path.name}.*.tmp"))  # what byol_fast.train's resume removes
    assert len(torn) == 1 and torn[0].stat().st_size == 4 << 20
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(torn[0])


# A process that returns from its main code with a write in flight and an error nobody collected.
EXITING_CHILD = """
import sys
import torch
from byol_fast.weights import checkpoint as ckpt
from byol_fast.weights.checkpoint_writer import BackgroundWriter

BackgroundWriter().save({"step": 1}, sys.argv[2], ckpt.PRETRAIN)  # fails: its folder is a file
keep = BackgroundWriter()
keep.save({"step": 5, "w": torch.full((4 << 20,), 5.0)}, sys.argv[1], ckpt.PRETRAIN)
"""


def test_an_exiting_process_finishes_its_write_and_reports_an_uncollected_error(tmp_path):
    path, bad = tmp_path / "last.pt", unwritable(tmp_path)
    res = subprocess.run([sys.executable, "-c", EXITING_CHILD, str(path), str(bad)], env=CHILD_ENV, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    state = ckpt.load(path, ckpt.PRETRAIN)
    assert state["step"] == 5 and torch.equal(state["w"], torch.full((4 << 20,), 5.0))
    assert "background checkpoint write failed" in res.stderr and "not_a_folder" in res.stderr


@pytest.mark.gpu
def test_cuda_tensors_are_copied_to_pinned_buffers_at_save_time(tmp_path, gated):
    state = {"step": 3, "w": torch.randn(1 << 20, device="cuda"), "i": torch.arange(10, device="cuda"),
             "cl": torch.randn(2, 3, 4, 5, device="cuda").to(memory_format=torch.channels_last),
             "cpu": torch.randn(4), "od": collections.OrderedDict(b=torch.ones(3, device="cuda"))}
    ckpt.save(state, tmp_path / "sync.pt", ckpt.PRETRAIN)

    def on_host(obj):  # an independent copy of the state, on the CPU
        if isinstance(obj, dict):
            return type(obj)((k, on_host(v)) for k, v in obj.items())
        return obj.cpu().clone() if torch.is_tensor(obj) else obj

    expected = on_host(state)
    writer = BackgroundWriter()
    for i in range(2):  # the second save reuses the pinned buffers
        writer.save(state, tmp_path / f"{i}.pt", ckpt.PRETRAIN)
        if i == 0:
            assert all(b.is_pinned() for k, b in writer._buffers.items() if k[0] != "cpu")
        for t in tensors(state):
            t.add_(1)  # queued on the current stream after the copies
        gated.set()
        writer.wait()
        gated.clear()
        assert_same(ckpt.load(tmp_path / f"{i}.pt"), {"kind": ckpt.PRETRAIN, **expected})
        expected = on_host(state)
    writer.close()
    assert_same(ckpt.load(tmp_path / "sync.pt"), ckpt.load(tmp_path / "0.pt"))
