"""No file a user points at can run code (byol_fast/safe_load.py): crafted files of each kind are
refused with one line by every entry point that reads files, and their payload never runs."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CHILD_ENV, ROOT, TINY_RUN, write_noise_jpegs

from byol_fast import checkpoint, export, linear_eval, safe_load, train
from byol_fast.checkpoint import CheckpointError
from byol_fast.features import load_feature_extractor


class Payload:
    """Unpickling this calls os.system: the file's author runs a command on the reader's machine."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted(tmp_path, kind: str):
    """(file, marker): a file of ``kind`` whose loading would create ``marker``."""
    marker = tmp_path / f"ran-{kind}"
    obj = {"state_dict": Payload(marker), "online": {}, "config": {}}
    path = tmp_path / f"evil-{kind}.pt"
    if kind == "torch-zip":
        torch.save(obj, path)
    elif kind == "torch-legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    return path, marker


KINDS = ["torch-zip", "torch-legacy", "plain-pickle"]


def test_the_payload_does_run_when_loaded_the_unsafe_way(tmp_path):
    """The crafted files are real attacks: torch.load(weights_only=False) runs them."""
    path, marker = crafted(tmp_path, "torch-zip")
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_the_feature_api_refuses_without_running_it(tmp_path, kind):
    path, marker = crafted(tmp_path, kind)
    with pytest.raises(CheckpointError, match=r"refused: loading it would call (posix|os)\.system") as e:
        load_feature_extractor(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_entry_points_refuse_in_one_line(tmp_path, capsys, kind):
    path, marker = crafted(tmp_path, kind)
    assert export.main(["--checkpoint", str(path), "--out", str(tmp_path / "x.pt")]) == 2
    assert linear_eval.main(["--checkpoint", str(path), "--data", str(tmp_path), f"--out_dir={tmp_path / 'l'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") and "refused" in line for line in err)
    assert not marker.exists()


def test_resume_refuses_a_planted_last_pt(tmp_path, capsys):
    images = write_noise_jpegs(tmp_path / "imgs", 16)
    out = tmp_path / "run"
    out.mkdir()
    path, marker = crafted(tmp_path, "torch-zip")
    path.rename(out / "last.pt")
    assert train.main(TINY_RUN + [f"--data.path={images}", f"--out_dir={out}", "--optim.batch_size=8"]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_a_pickle_of_numpy_arrays_reads_and_nothing_else_does(tmp_path):
    """Paddle's .pdparams and JAX/Haiku .pkl releases are plain pickles of numpy arrays."""
    arrays = {"conv1_weights": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2), "bn._mean": np.zeros(3),
              "step": np.int64(7), "nested": [{"w": np.ones((2,), np.float16)}]}
    path = tmp_path / "model.pdparams"
    with open(path, "wb") as f:
        pickle.dump(arrays, f, protocol=2)
    got = safe_load.read(path)
    assert got.keys() == arrays.keys() and got["step"] == 7
    assert np.array_equal(got["conv1_weights"], arrays["conv1_weights"]) and got["nested"][0]["w"].dtype == np.float16
    with open(tmp_path / "other.pkl", "wb") as f:
        pickle.dump({"x": subprocess.Popen}, f)  # a class, not a call: still a global outside the allow-list
    with pytest.raises(safe_load.UnsafeFileError, match="subprocess.Popen"):
        safe_load.read(tmp_path / "other.pkl")


def test_our_checkpoints_load_with_weights_only_alone(tmp_path):
    """No allow-list needed: what a user's plain torch.load(path) (weights_only by default) reads."""
    images = write_noise_jpegs(tmp_path / "imgs", 16)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "byol_fast.train", *TINY_RUN, f"--data.path={images}", f"--out_dir={out}",
           "--optim.batch_size=8", "--max_steps=1", "--monitor.probe=true"]
    assert subprocess.run(cmd, cwd=ROOT, env=CHILD_ENV, capture_output=True, timeout=300).returncode == 0
    state = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint.kind_of(state) == checkpoint.PRETRAIN
    assert isinstance(state["loader"][0]["pipeline"], bytes)  # mid-epoch: DALI's checkpoint, as bytes
    old_style = {**state, "rng": {**state["rng"], "numpy": np.random.get_state()}}  # before 2026-12-02
    torch.save(old_style, tmp_path / "old.pt")
    assert checkpoint.load(tmp_path / "old.pt")["rng"]["numpy"][0] == "MT19937"  # numpy arrays are data


@pytest.mark.parametrize("kind", KINDS)
def test_plain_data_beside_the_weights_reads_as_inert_stand_ins(tmp_path, kind, monkeypatch):
    """A training script's argparse.Namespace and an mmengine checkpoint's log buffers sit beside
    the weights of files users bring: the weights read, those objects become Unread stand-ins
    holding their attributes, and their class's own code (here a __setstate__ with a side effect)
    never runs. The file's other globals are still refused."""
    import argparse
    import types

    marker = tmp_path / f"ran-{kind}"

    class HistoryBuffer:
        def __init__(self):
            self._log_history = np.arange(3.0)

        def __setstate__(self, state):
            open(marker, "w").close()

    fake = types.ModuleType("mmengine.logging.history_buffer")
    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = fake.__name__, "HistoryBuffer"
    fake.HistoryBuffer = HistoryBuffer
    parents = {n: types.ModuleType(n) for n in ("mmengine", "mmengine.logging")}
    parents["mmengine"].logging, parents["mmengine.logging"].history_buffer = parents["mmengine.logging"], fake
    for name, mod in (*parents.items(), (fake.__name__, fake)):
        monkeypatch.setitem(sys.modules, name, mod)
    weights = {"conv1.weight": np.ones((2, 3), np.float32)} if kind == "plain-pickle" else \
        {"conv1.weight": torch.ones(2, 3)}
    obj = {"model": weights, "args": argparse.Namespace(lr=0.1, arch="resnet50"),
           "message_hub": {"log_scalars": {"loss": HistoryBuffer()}}}
    path = tmp_path / f"train-{kind}.pth"
    if kind == "plain-pickle":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=kind == "torch-zip")
    monkeypatch.delitem(sys.modules, fake.__name__)  # the reader must not need the class
    got = safe_load.read(path)
    assert not marker.exists()
    assert got["model"]["conv1.weight"].sum() == 6
    args, buffer = got["args"], got["message_hub"]["log_scalars"]["loss"]
    assert isinstance(args, safe_load.Unread) and args.kind == "argparse.Namespace"
    assert args.state == {"lr": 0.1, "arch": "resnet50"} and "not read" in repr(args)
    assert isinstance(buffer, safe_load.Unread) and np.array_equal(buffer.state["_log_history"], np.arange(3.0))
