"""No file a user points at can run code (byol_fast/weights/safe_load.py): crafted files of each kind are
refused with one line by every entry point that reads files, and their payload never runs."""
import collections
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CHILD_ENV, ROOT, TINY_RUN, write_noise_jpegs

from byol_fast.weights import checkpoint, safe_load, unpickler
from byol_fast import export, linear_eval, train
from byol_fast.errors import CheckpointError
from byol_fast.weights.encoder_file import load_feature_extractor


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


@pytest.mark.slow
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
    old_style = {**state, "rng": {**state["rng"], "numpy": np.random.get_state()}}  # as an older version saved it
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
    assert isinstance(args, unpickler.Unread) and args.kind == "argparse.Namespace"
    assert args.state == {"lr": 0.1, "arch": "resnet50"} and "not read" in repr(args)
    assert isinstance(buffer, unpickler.Unread) and np.array_equal(buffer.state["_log_history"], np.arange(3.0))


# numpy's array and dtype state, forged: numpy trusts it, so the readers must not hand it over.
_RECONSTRUCT = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct


class _Dtype:
    """Pickles as numpy writes a dtype (``dtype(code, False, True)`` then BUILD), with any state."""

    def __init__(self, code, state):
        self.code, self.state = code, state

    def __reduce__(self):
        return np.dtype, (self.code, False, True), self.state


class _Array:
    """Pickles as numpy writes an array (``_reconstruct`` then BUILD), with any dtype and data."""

    def __init__(self, shape, dtype, data):
        self.state = (1, shape, dtype, False, data)

    def __reduce__(self):
        return _RECONSTRUCT, (np.ndarray, (0,), b"b"), self.state


class _Call:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _nested(depth):
    array = _Array((1,), _Dtype("O8", (3, "|", None, None, None, -1, -1, 63)), [None])
    for _ in range(depth):
        array = _Array((1,), _Dtype("O8", (3, "|", None, None, None, -1, -1, 63)), [array])
    return array


FORGED = {
    # a void dtype claiming an object field while its flags say it holds no objects: numpy reads
    # the file's 8 bytes as a pointer to a Python object
    "object-field": _Array((1,), _Dtype("V8", (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0)), b"A" * 8),
    "object-field-flagged": _Array((1,), _Dtype("V8", (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 1)),
                                   b"A" * 8),
    # an object array given raw bytes instead of its list of objects
    "object-raw-bytes": _Array((1,), _Dtype("O8", (3, "|", None, None, None, -1, -1, 63)), b"A" * 8),
    # fewer bytes than the shape needs
    "short-data": _Array((4,), _Dtype("f4", (3, "<", None, None, None, -1, -1, 0)), b"\0" * 8),
    # a scalar of an object-field dtype
    "object-scalar": None,
    # object arrays nested in object arrays: numpy frees such a chain recursively in C (thousands
    # deep overflow the stack); more than 32 deep are refused
    "nested-object-arrays": None,
    # a shape of huge numbers: multiplying them out takes minutes
    "huge-shape": _Array((2**200,) * 8, _Dtype("f4", (3, "<", None, None, None, -1, -1, 0)), b""),
    # unicode strings holding numbers that are not characters (numpy fails on reading them)
    "bad-code-points": _Array((1,), _Dtype("U1", (3, "<", None, None, None, 4, 4, 8)), b"\xff\xff\xff\x7f"),
    # gigabytes from a few bytes, through what torch's own reader admits
    "bytearray-of-a-size": _Call(bytearray, (1 << 20,)),
    "tensor-of-a-size": _Call(torch.FloatTensor, (1 << 20,)),
    # torch's rebuild of a tensor with attributes, calling something else and setting state on it
    "rebuild-from-type": _Call(torch._tensor._rebuild_from_type_v2,
                               (collections.OrderedDict, torch.Tensor, ([("k", 1)],), {"x": 1})),
}


def _write(obj, path, kind):
    if kind == "plain-pickle":
        path.write_bytes(pickle.dumps({"w": obj}, protocol=2))
    else:
        torch.save({"w": obj}, path, _use_new_zipfile_serialization=kind == "torch-zip")


def test_forged_numpy_state_is_refused_and_never_reaches_numpy(tmp_path):
    """Each forged file is read in a child process, so that numpy crashing on it (what happens when
    the forged state reaches numpy's __setstate__) fails the test instead of the test run; the child
    has registered numpy's real functions with torch first (torch's own advice), which byol_fast's
    reader must ignore."""
    forged = {**FORGED, "object-scalar": _Scalar(_Dtype("V8", FORGED["object-field"].state[2].state), b"A" * 8),
              "nested-object-arrays": _nested(40)}
    paths = []
    for name, obj in forged.items():
        for kind in KINDS:
            paths.append(tmp_path / f"{name}-{kind}.pt")
            _write(obj, paths[-1], kind)
    # What torch's own refusal tells users to register: the reader must not depend on torch's registry.
    script = ("import sys, numpy, torch\nfrom byol_fast.weights import safe_load\n"
              "torch.serialization.add_safe_globals([numpy._core.multiarray._reconstruct, numpy.ndarray, numpy.dtype,"
              " numpy.dtypes.VoidDType, numpy.dtypes.ObjectDType, numpy._core.multiarray.scalar])\n"
              "for p in sys.argv[1:]:\n"
              "    try:\n        safe_load.read(p); print('READ', p, flush=True)\n"
              "    except safe_load.UnsafeFileError as e:\n        print('REFUSED', e, flush=True)\n")
    run = subprocess.run([sys.executable, "-c", script, *map(str, paths)], cwd=ROOT, env=CHILD_ENV,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]  # a negative code: numpy crashed on the forged state
    lines = run.stdout.splitlines()
    assert len(lines) == len(paths) and all(line.startswith("REFUSED") for line in lines), lines
    assert all(str(p) in line for p, line in zip(paths, lines))
    assert "structured or sub-array numpy dtype" in lines[0] and "object array" in lines[2 * len(KINDS)]


class _Scalar:
    def __init__(self, dtype, data):
        self.dtype, self.data = dtype, data

    def __reduce__(self):
        return (np._core if hasattr(np, "_core") else np.core).multiarray.scalar, (self.dtype, self.data)


def test_a_dtype_reads_with_numpy_s_own_flags_whatever_the_file_says(tmp_path):
    """A float dtype whose state claims numpy's object flags is still a float dtype: the flags, item
    size and alignment come from numpy for the type code, never from the file."""
    raw = np.arange(3, dtype="<f8").tobytes()
    path = tmp_path / "flags.pkl"
    path.write_bytes(pickle.dumps({"w": _Array((3,), _Dtype("f8", (3, "<", None, None, None, 99, 99, 63)), raw)}))
    got = safe_load.read(path)["w"]
    assert type(got) is np.ndarray and got.dtype == np.float64 and not got.dtype.hasobject
    assert got.tolist() == [0.0, 1.0, 2.0]


LEGIT = {
    "f32": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "f16-big-endian": np.arange(5, dtype=">f2"),
    "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)), "int64": np.array([-1, 2**40]),
    "bool": np.array([True, False]), "complex": np.array([1 + 2j]), "unicode": np.array(["ab", "c"]),
    "bytes": np.array([b"xy"]), "zero-d": np.array(3.5), "empty": np.zeros((0, 3), np.uint8),
    "objects": np.array([None, "s", np.arange(2)], dtype=object),
    "datetime": np.array(["2020-01-01T10:00"], dtype="M8[m]"), "timedelta": np.timedelta64(5, "ms"),
    "scalars": (np.float32(1.5), np.int8(-3), np.bool_(True), np.datetime64("2020-01-01")),
    "dtypes": [np.dtype("f4"), np.dtype(">i8"), np.dtype("U3")],
}


@pytest.mark.parametrize("protocol", [2, 4])
def test_arrays_read_as_numpy_s_own_unpickler_reads_them(tmp_path, protocol):
    """The checked builders against numpy's own unpickling (the reference), plain pickles and torch files."""
    reference = pickle.loads(pickle.dumps(LEGIT, protocol=protocol))
    path = tmp_path / "legit.pkl"
    path.write_bytes(pickle.dumps(LEGIT, protocol=protocol))
    torch.save(LEGIT, tmp_path / "legit.pt")
    for got in (safe_load.read(path), safe_load.read(tmp_path / "legit.pt")):
        assert got.keys() == reference.keys()
        for key, want in reference.items():
            if isinstance(want, np.ndarray):
                assert type(got[key]) is np.ndarray and got[key].dtype == want.dtype, key
                assert got[key].shape == want.shape and got[key].flags.f_contiguous == want.flags.f_contiguous, key
                if want.dtype.hasobject:
                    assert got[key][:2].tolist() == want[:2].tolist() and np.array_equal(got[key][2], want[2])
                else:
                    assert got[key].tobytes() == want.tobytes(), key
            else:
                assert repr(got[key]) == repr(want), key


def _global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _text(value):
    return b"X" + len(value.encode()).to_bytes(4, "little") + value.encode()


@pytest.mark.parametrize("target", [("dill._dill", "_create_namedtuple"), ("argparse", "Namespace"),
                                    ("byol.byol_experiment", "_ByolExperimentState"), ("numpy", "dtype")])
def test_a_file_cannot_set_attributes_on_what_the_allow_list_holds(tmp_path, target):
    """pickle's BUILD with a slot-state dict sets attributes on any object: on an allow-listed class
    or function it would change how every later file reads. Only the array builders and the Unread
    stand-ins take state."""
    before = unpickler.ALLOWED[target].__dict__.copy() if hasattr(unpickler.ALLOWED[target], "__dict__") else None
    body = _global(*target) + b"N}" + _text("__defaults__") + b"(" + _text("x") + b"ts\x86b"
    path = tmp_path / "build.pkl"
    path.write_bytes(b"\x80\x02" + body + b".")
    with pytest.raises(safe_load.UnsafeFileError, match="refused: setting the state of"):
        safe_load.read(path)
    if before is not None:
        assert "__defaults__" not in unpickler.ALLOWED[target].__dict__ or \
            unpickler.ALLOWED[target].__dict__["__defaults__"] == before.get("__defaults__")


def test_bytes_are_decoded_only_as_protocol_2_writes_them(tmp_path):
    path = tmp_path / "codec.pkl"
    path.write_bytes(b"\x80\x02" + _global("_codecs", "encode") + b"(" + _text("x") + _text("idna") + b"tR.")
    with pytest.raises(safe_load.UnsafeFileError, match="_codecs.encode with 'idna'"):
        safe_load.read(path)


@pytest.mark.parametrize("body, refusal", [
    (_global("collections", "OrderedDict") + b"(" + _text("x") + b"e", "APPENDS on OrderedDict"),
    (_global("argparse", "Namespace") + b")R" + _text("k") + _text("v") + b"s", "SETITEM on a Namespace object"),
])
def test_lists_and_dicts_only_take_items(tmp_path, body, refusal):
    """APPEND and SETITEM act only on lists and dicts (as torch's weights-only reader has them)."""
    path = tmp_path / "items.pkl"
    path.write_bytes(b"\x80\x02" + body + b".")
    with pytest.raises(safe_load.UnsafeFileError, match=refusal):
        safe_load.read(path)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_a_torchscript_program_is_refused_not_run(tmp_path, monkeypatch):
    """torch.load hands a TorchScript archive to torch.jit.load, which runs the program's code; the
    reader refuses it, and reads torch files the same under TORCH_FORCE_WEIGHTS_ONLY_LOAD."""
    path = tmp_path / "program.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(safe_load.UnsafeFileError, match="TorchScript program"):
        safe_load.read(path)
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    torch.save({"w": torch.ones(2), "a": np.arange(3)}, tmp_path / "w.pt")
    got = safe_load.read(tmp_path / "w.pt")
    assert torch.equal(got["w"], torch.ones(2)) and got["a"].tolist() == [0, 1, 2]


def test_tensors_with_attributes_and_parameters_read_as_torch_reads_them(tmp_path):
    """What torch.load(weights_only=True) reads (the reference), our reader reads the same."""
    tensor, param = torch.arange(3.0), torch.nn.Parameter(torch.ones(2))
    tensor.note, param.tag = "x", 2
    state = collections.OrderedDict(w=torch.randn(2, 3), b=torch.zeros(3, dtype=torch.int8))
    state._metadata = {"": {"version": 2}}
    base = torch.arange(24.0).reshape(4, 6)  # views of one storage: offsets, transposes, steps, broadcasts
    views = {"base": base, "slice": base[1:3, 2:5], "t": base.t(), "step": base[:, ::2],
             "expanded": torch.ones(3, 1).expand(3, 5), "empty": torch.empty(0, 3)}
    obj = {"t": tensor, "p": param, "sd": state, "size": torch.Size([2, 3]), "dev": torch.device("cpu"),
           "dtype": torch.bfloat16, "s": {1, 2}, "c": 1 + 2j, "ba": bytearray(b"xy"), "views": views}
    for legacy in (False, True):
        path = tmp_path / f"t{legacy}.pt"
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        want, got = torch.load(path, weights_only=True), safe_load.read(path)
        assert got["t"].note == want["t"].note == "x" and got["p"].tag == 2 and type(got["p"]) is torch.nn.Parameter
        assert got["sd"]._metadata == want["sd"]._metadata and all(torch.equal(got["sd"][k], want["sd"][k]) for k in state)
        assert [got[k] for k in ("size", "dev", "dtype", "s", "c", "ba")] == \
            [want[k] for k in ("size", "dev", "dtype", "s", "c", "ba")]
        for k, view in got["views"].items():
            assert torch.equal(view, want["views"][k]) and view.stride() == want["views"][k].stride(), k
        assert got["views"]["slice"].untyped_storage().data_ptr() == got["views"]["base"].untyped_storage().data_ptr()


def _int(n):
    return b"J" + int(n).to_bytes(4, "little", signed=True)


def _legacy(path, body, stored_keys=b"]"):
    """A legacy-format torch file (its three header pickles, then ``body``, then the stored keys)."""
    with open(path, "wb") as f:
        for header in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION,
                       {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(header, f, protocol=2)
        f.write(b"\x80\x02" + body + b"." + b"\x80\x02" + stored_keys + b".")


def _storage_id(kind, *fields):
    return b"(" + _text(kind) + b"".join(fields) + b"tQ"


def test_torch_files_refuse_what_torch_s_own_readers_would_do_with_them(tmp_path, monkeypatch):
    """Legacy persistent ids other than storages (torch writes a diff of a "module"'s source into the
    current folder), storages the file does not hold (torch hands back uninitialised memory) or larger
    than the file, tensors and storages of a size the file chooses, expanded views of a trillion
    elements, and torch's oldest format (a tar archive torch extracts unfiltered: a hard link out of its
    folder gets its permissions changed)."""
    import tarfile

    monkeypatch.chdir(tmp_path)
    float_storage = _global("torch", "FloatStorage")
    cases = {
        "module-id": (_storage_id("module", _global("collections", "OrderedDict"), _text("src.py"), _text("x")),
                      "persistent id that is not a storage"),
        "unfilled": (_storage_id("storage", float_storage, _text("k"), _text("cpu"), _int(2), b"N"),
                     "storages the file does not hold"),
        "larger-than-file": (_storage_id("storage", float_storage, _text("k"), _text("cpu"), _int(1 << 28), b"N"),
                             "storages of 1073741824 bytes"),
        "sized-storage": (_global("torch.storage", "UntypedStorage") + b"(" + _int(1 << 20) + b"t\x81",
                          "UntypedStorage with arguments"),
        "expanded-view": (_global("torch._utils", "_rebuild_tensor") + b"(" + _storage_id(
            "storage", float_storage, _text("k"), _text("cpu"), _int(1), b"N") + _int(0) + b"(" + _int(1 << 30)
            + b"t(" + _int(0) + b"ttR", "a tensor view of 1073741824 elements over 1 stored"),
        # torch grows a storage to fit its view: the rest is uninitialised memory
        "view-past-storage": (_global("torch._utils", "_rebuild_tensor") + b"(" + _storage_id(
            "storage", float_storage, _text("k"), _text("cpu"), _int(1), b"N") + _int(0) + b"(" + _int(1000)
            + b"t(" + _int(1) + b"ttR", "a tensor reaching 4000 bytes into a storage of 4"),
    }
    for name, (body, refusal) in cases.items():
        stored = name in ("expanded-view", "view-past-storage")
        _legacy(tmp_path / f"{name}.pt", body, b"(" + _text("k") + b"l" if stored else b"]")
        if stored:  # the one storage's 4 bytes, after its stored key
            with open(tmp_path / f"{name}.pt", "ab") as f:
                f.write((1).to_bytes(8, "little") + b"\0\0\x80\x3f")
        with pytest.raises(safe_load.UnsafeFileError, match=refusal):
            safe_load.read(tmp_path / f"{name}.pt")
    assert not list(tmp_path.glob("*.patch"))

    victim = tmp_path / "victim.txt"
    victim.write_text("x")
    victim.chmod(0o600)
    magic = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2).decode("utf-8", "surrogateescape")
    with tarfile.open(tmp_path / "old.pt", "w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        tar.addfile(tarfile.TarInfo(magic))
        link = tarfile.TarInfo("storages")
        link.type, link.linkname, link.mode = tarfile.LNKTYPE, str(victim), 0o777
        tar.addfile(link)
    with pytest.raises(safe_load.UnsafeFileError, match="tar archive"):
        safe_load.read(tmp_path / "old.pt")
    assert victim.stat().st_mode & 0o777 == 0o600


def test_a_small_file_cannot_make_many_objects_from_few_bytes(tmp_path):
    """A pickle refers to one piece of data as often as it likes (a few bytes each time): arrays built
    from one reused data block beyond the file's size, namedtuple classes beyond 64 or with over 64
    fields (dill's form), and attributes beside a state_dict's _metadata are refused."""
    dtype = _global("numpy", "dtype") + b"(" + _text("u1") + b"\x89\x88tR(" + _int(3) + _text("|") + b"NNN" + \
        _int(-1) + _int(-1) + _int(0) + b"tb"
    reconstruct = _global("numpy._core.multiarray", "_reconstruct")
    block = b"B" + (1 << 20).to_bytes(4, "little") + b"\0" * (1 << 20) + b"q\x00"  # 1 MiB, memoised
    array = reconstruct + b"(" + _global("numpy", "ndarray") + b"(" + _int(0) + b"tC\x01btR(" + _int(1) + b"(" + \
        _int(1 << 20) + b"t" + dtype + b"\x89h\x00tb"
    files = {
        "reused-data": (b"\x80\x04" + block + b"0(" + array * 4 + b"l.", "more bytes than the file holds"),
        "wide-namedtuple": (b"\x80\x04" + _global("dill._dill", "_create_namedtuple") + b"(" + _text("T") + b"(" +
                            b"".join(_text(f"f{i}") for i in range(65)) + b"l" + _text("m") + b"tR.", "over 64 fields"),
        "many-namedtuples": (b"\x80\x04(" + b"".join(_global("dill._dill", "_create_namedtuple") + b"(" + _text(f"T{i}")
                                                     + b"(" + _text("a") + b"l" + _text("m") + b"tR" for i in range(65))
                             + b"l.", "more than 64 namedtuple classes"),
        "shadowing-metadata": (b"\x80\x02" + _global("collections", "OrderedDict") + b")R}" + _text("keys") +
                               _global("collections", "OrderedDict") + b"sb.", "setting the state of a OrderedDict"),
    }
    for name, (data, refusal) in files.items():
        (tmp_path / f"{name}.pkl").write_bytes(data)
        with pytest.raises(safe_load.UnsafeFileError, match=refusal):
            safe_load.read(tmp_path / f"{name}.pkl")
    one = b"\x80\x04" + block + b"0(" + array + b"l."  # the same array once: read
    (tmp_path / "once.pkl").write_bytes(one)
    assert safe_load.read(tmp_path / "once.pkl")[0].shape == (1 << 20,)


def _nested_tuple(levels: int) -> bytes:
    """A pickle leaving in memo slot ``levels`` a tuple of 10 references to the level below, 10**levels
    elements expanded, in a few hundred bytes."""
    body = b"Nq\x00"
    for i in range(1, levels + 1):
        body += b"0(" + (b"h" + bytes([i - 1])) * 10 + b"tq" + bytes([i])
    return body + b"0"


@pytest.mark.parametrize("use, refusal", [
    (b"}h\x1eNs", "a dict key or set item of a tuple"),  # hashing it walks all 10**30
    (_global("builtins", "set") + b"h\x1e\x85R", "a dict key or set item of a tuple"),
    (_global("numpy", "dtype") + b"(h\x1e\x89\x88tR", "numpy dtype a tuple"),  # formatting it too
])
def test_nested_tuples_are_never_hashed_or_formatted_whole(tmp_path, use, refusal):
    path = tmp_path / "nested.pt"
    torch.save({}, path)  # a torch file: its pickle replaced by ours
    import zipfile
    with zipfile.ZipFile(path) as src:
        records = {info.filename: src.read(info.filename) for info in src.infolist()}
    name = next(n for n in records if n.endswith("data.pkl"))
    records[name] = b"\x80\x02" + _nested_tuple(30) + use + b"."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for n, data in records.items():
            dst.writestr(n, data)
    with pytest.raises(safe_load.UnsafeFileError, match=refusal):
        safe_load.read(path)


def test_a_shared_list_is_walked_once_by_the_deepmind_converter():
    from byol_fast.weights.importers.deepmind import _leaves

    tree = [1]
    for _ in range(30):  # 10**30 paths if each reference were walked
        tree = [tree] * 10
    assert len(list(_leaves(tree, "opt_state"))) == 9 * 30 + 1  # each list once, each further reference a leaf


def test_a_tensor_s_private_attributes_are_refused(tmp_path):
    tensor = torch.ones(2)
    tensor._backward_hooks_alike = {}
    torch.save({"t": tensor}, tmp_path / "private.pt")
    with pytest.raises(safe_load.UnsafeFileError, match="private attributes"):
        safe_load.read(tmp_path / "private.pt")


@pytest.mark.parametrize("body, refusal", [
    # a mapping built from an array or tensor iterates to items no check has seen
    (_global("collections", "OrderedDict") + b"(" + _global("numpy._core.multiarray", "_reconstruct") + b"(" +
     _global("numpy", "ndarray") + b"(" + _int(0) + b"tC\x01btRt" + b"R", "OrderedDict of a ArraySpec"),
    # an int's hash is not cached: a huge one, as a key named many times, is rehashed each time
    (b"}\x8a\x82" + b"\x01" * 130 + b"Ns", "a dict key or set item of an int of"),
])
def test_keys_only_from_checked_items(tmp_path, body, refusal):
    path = tmp_path / "keys.pkl"
    path.write_bytes(b"\x80\x02" + body + b".")
    with pytest.raises(safe_load.UnsafeFileError, match=refusal):
        safe_load.read(path)


def test_a_file_s_odd_kind_or_metadata_is_a_checkpoint_error(tmp_path):
    """kind_of reads what the file says: an array as "kind", a list as the encoder tag."""
    odd = collections.OrderedDict(a=torch.ones(1))
    odd._metadata = {"": [1]}
    for name, obj in (("kind", {"kind": np.array(["a", "b"])}), ("meta", odd)):
        torch.save(obj, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match="is not a .*pretrain checkpoint"):
            checkpoint.load(tmp_path / f"{name}.pt", kind=checkpoint.PRETRAIN)
