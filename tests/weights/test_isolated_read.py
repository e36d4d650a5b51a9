"""Pickle-based files are read first in a child process under kernel limits
(byol_fast.weights.isolated_read): a file whose objects are shared into a structure vastly larger than
the file, one that takes too long or too much memory to read, and one that changes between the two
reads are refused in one line, and this process is never the one that runs out."""
import os
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import CHILD_ENV, ROOT

from byol_fast.weights import isolated_read
from byol_fast.weights.unpickler import UnsafeFileError


def shared_lists(depth: int):
    """A list nesting two references to the list below it, ``depth`` times: 2**depth leaves in a few
    bytes a level (the pickle's memo writes each list once)."""
    tree = [torch.zeros(1)]
    for _ in range(depth):
        tree = [tree, tree]
    return tree


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_objects_shared_into_a_huge_tree_are_refused(tmp_path, writer):
    path = tmp_path / "bomb.pt"
    if writer == "torch":
        torch.save({"state_dict": shared_lists(60)}, path)
    else:
        tree = [1.0]
        for _ in range(60):
            tree = [tree, tree]
        path.write_bytes(pickle.dumps({"state_dict": tree}, protocol=4))
    assert path.stat().st_size < 4096
    with pytest.raises(UnsafeFileError, match=r"bomb.pt: refused: its objects, counted as a tree, are over 100,000"):
        isolated_read.read(path, nodes=100_000)  # the default, 10 million, takes the child seconds to count
    if writer == "pickle":
        return
    # Through a command, at the default count: one line naming the file, exit status 2.
    done = subprocess.run([sys.executable, "-m", "byol_fast.convert", str(path), "--out", str(tmp_path / "out.pt")],
                          env=CHILD_ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "bomb.pt" in done.stderr, done.stderr


def test_a_moderate_tree_is_read_whole(tmp_path):
    path = tmp_path / "fine.pt"
    torch.save({"state_dict": shared_lists(10)}, path)  # 1,024 leaves: a structure a file may share
    # the dict and its key, 2**10 - 1 lists of two, 2**10 lists of one tensor, 2**10 tensors
    assert isolated_read.count_nodes(isolated_read.read(path)) == 2 + (2 ** 10 - 1) + 2 * 2 ** 10


def test_the_childs_memory_limit_refuses_and_this_process_is_untouched(tmp_path):
    path = tmp_path / "big.pt"
    torch.save({"w": torch.zeros(16 << 20)}, path)  # 64 MB of storage
    with pytest.raises(UnsafeFileError, match=r"big.pt: refused: reading it needs more than 0.0 GB of memory"):
        isolated_read.read(path, memory=8 << 20)
    assert isolated_read.read(path)["w"].shape == (16 << 20,)  # within the default limits


def test_the_childs_time_limit_refuses(tmp_path):
    path = tmp_path / "slow.pkl"
    path.write_bytes(pickle.dumps({"w": list(range(4_000_000))}, protocol=4))  # seconds of pure-Python unpickling
    with pytest.raises(UnsafeFileError, match=r"slow.pkl: refused: reading it took more than 0 s of CPU time"):
        isolated_read.read(path, seconds=0)


def test_a_file_changed_between_the_two_reads_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(3)}, path)

    def then_replaced(p, seconds, memory, nodes):  # the child's read passes; the file is replaced after it
        torch.save({"w": torch.zeros(3)}, p)
        os.utime(p, ns=(1, 1))

    monkeypatch.setattr(isolated_read, "_dry_run", then_replaced)
    with pytest.raises(UnsafeFileError, match=r"w.pt: refused: it changed while it was read"):
        isolated_read.read(path)


def test_the_readers_own_errors_come_back_as_they_are(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps({"w": [1.0] * 100}, protocol=4)[:-20])
    with pytest.raises(Exception) as child:
        isolated_read.read(path)
    from byol_fast.weights import safe_load

    with pytest.raises(Exception) as direct:
        safe_load.read(path)
    assert type(child.value) is type(direct.value) and str(child.value) == str(direct.value)
