"""The run folder, checked before the work: made, writable, room for a checkpoint; each problem one
line naming out_dir, exit 2, before any training."""
import errno
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest
import torch
from conftest import CHILD_ENV, ROOT, TINY_RUN, write_noise_jpegs

from byol_fast.errors import ConfigError
from byol_fast.runtime import out_dir


def test_a_folder_is_made_with_its_parents_and_left_empty(tmp_path):
    path = out_dir.prepare(tmp_path / "a" / "b")
    assert path.is_dir() and not list(path.iterdir())


def test_a_file_on_the_path_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"out_dir: .*file.*part of the path is a file"):
        out_dir.prepare(tmp_path / "file" / "run")
    with pytest.raises(ConfigError, match=r"out_dir: .*file exists and is not a folder"):
        out_dir.prepare(tmp_path / "file")


def test_a_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):  # root ignores permission bits: the refusal a read-only disk gives
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(ConfigError, match=r"out_dir: cannot write in .*: Read-only file system"):
        out_dir.prepare(tmp_path / "run")


def test_room_for_a_checkpoint_is_the_checkpoints_size(tmp_path, monkeypatch):
    state = {"w": torch.zeros(1000, 1000), "nested": [torch.zeros(10, dtype=torch.float64)], "step": 3}
    assert out_dir.state_bytes(state) == 1000 * 1000 * 4 + 10 * 8
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 3_000_000, 3_000_000))
    with pytest.raises(ConfigError, match=r"out_dir: .* has 0.00 GB free; a checkpoint of this run takes about"):
        out_dir.check_room(tmp_path, out_dir.state_bytes(state))
    out_dir.check_room(tmp_path, 2_000_000)  # fits


def test_train_stops_before_any_work_when_out_dir_is_under_a_file(tmp_path):
    images = write_noise_jpegs(tmp_path / "imgs", 8)
    (tmp_path / "file").write_text("x")
    cmd = [sys.executable, "-m", "byol_fast.train", *TINY_RUN, f"--data.path={images}",
           f"--out_dir={tmp_path / 'file' / 'run'}", "--optim.batch_size=4", "--max_steps=1"]
    res = subprocess.run(cmd, cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "out_dir" in errors[0] and "part of the path is a file" in errors[0]
    assert "Traceback" not in res.stderr
