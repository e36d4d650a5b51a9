"""The files other projects' own code writes during training, converted (byol_fast.weights.importers).

Each file is built here from plain torch objects in the exact structure the project's code saves
(seen by running that code: mmengine's Runner and CheckpointHook, yaox12/BYOL-PyTorch's
``save_checkpoint``, lightly's tutorials, lucidrains' ``BYOL`` learner, a torchvision
``state_dict()``, a JAX array pickled by jax 0.10), and the converted encoder's features are
compared with those of the source network computed here independently. The classes and functions
those files name (mmengine's HistoryBuffer and its statistics methods, jax's array reconstruction)
are stood in for by classes of this module that leave a marker when any of their code runs: the
reader must never run them.
"""
from __future__ import annotations

import codecs
import collections
import copy
import io
import pickle
import pickletools
import sys
import types
import zipfile

import numpy as np
import pytest
import torch
from torch import nn
from test_importers_simple import _encoder_state, _expected, _images, _resnet, mmpretrain_file

from byol_fast import convert as convert_cli
from byol_fast.errors import CheckpointError
from byol_fast.weights import importers, safe_load, unpickler
from byol_fast.weights.checkpoint import load
from byol_fast.weights.encoder_file import load_feature_extractor


@pytest.fixture(scope="module")
def online() -> nn.Module:
    return _resnet(0)


@pytest.fixture(scope="module")
def target() -> nn.Module:
    return _resnet(1)


@pytest.fixture(scope="module")
def expected(online) -> torch.Tensor:
    return _expected(online)


def _fake_module(monkeypatch, name: str, **attrs) -> types.ModuleType:
    """A module ``name`` (and its parents) holding ``attrs``, so that pickle names them as the real ones."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    module = sys.modules[name]
    for key, value in attrs.items():
        value.__module__, value.__qualname__ = name, key
        for function in vars(value).values() if isinstance(value, type) else ():
            if isinstance(function, types.FunctionType):  # a class's own functions: named in that module too
                function.__module__ = name
        setattr(module, key, value)
    return module


def _converts(path, layout: str, expected: torch.Tensor, tmp_path, capsys, reasons=()) -> str:
    """``python -m byol_fast.convert`` on ``path``: its report, the written encoder's features and the
    file's own (read directly) equal to ``expected``."""
    out = tmp_path / "encoder.pt"
    assert convert_cli.main([str(path), "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert report.startswith(f"{layout}: mapped 120 backbone tensors"), report
    for reason in reasons:
        assert reason in report, (reason, report)
    torch.testing.assert_close(load_feature_extractor(out)(_images()), expected)
    torch.testing.assert_close(load_feature_extractor(path)(_images()), expected)
    return report


def _pickle_of(path) -> bytes:
    """The pickle inside a torch zip file."""
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))


# ---------------------------------------------------------------------------- 1. mmengine's runner


class HistoryBuffer:
    """Stands for mmengine's ``HistoryBuffer`` (``mmengine/logging/history_buffer.py``): its objects'
    state is what mmengine 0.10 pickles (``max_length``, ``_log_history``, ``_count_history`` and
    ``statistics_methods``, the class's own functions), and any of its code that runs leaves a marker."""

    marker = None

    def __init__(self, values):
        self.max_length = 1000000
        self._log_history = np.asarray(values, np.float64)
        self._count_history = np.ones(len(values), np.int64)
        self.statistics_methods = {name: getattr(HistoryBuffer, name) for name in ("min", "max", "current", "mean")}

    def __setstate__(self, state):
        open(HistoryBuffer.marker, "w").close()

    def min(self):  # each under its own name: pickle names a function by its __qualname__
        open(HistoryBuffer.marker, "w").close()

    def max(self):
        open(HistoryBuffer.marker, "w").close()

    def current(self):
        open(HistoryBuffer.marker, "w").close()

    def mean(self):
        open(HistoryBuffer.marker, "w").close()


def mmengine_training_file(online, target, marker) -> dict:
    """What mmengine's ``Runner.save_checkpoint`` writes during training (seen with mmengine 0.10.7's
    CheckpointHook): ``meta``, ``state_dict`` (mmpretrain's BYOL), ``message_hub`` (its
    ``state_dict()``: ``log_scalars`` of HistoryBuffers, ``runtime_info``, ``resumed_keys``),
    ``optimizer`` and ``param_schedulers``."""
    HistoryBuffer.marker = str(marker)
    released = mmpretrain_file(online, target)
    hub = {"log_scalars": collections.OrderedDict([("train/lr", HistoryBuffer([0.01, 0.01])),
                                                   ("train/loss", HistoryBuffer([0.3, -0.1]))]),
           "runtime_info": collections.OrderedDict([("cfg", "model = dict(type='BYOL')"), ("seed", 971235441),
                                                    ("epoch", 1), ("iter", 3), ("eta", np.float64(0.0)),
                                                    ("last_ckpt", "work_dirs/epoch_2.pth")]),
           "resumed_keys": collections.OrderedDict([("epoch", True), ("iter", True)])}
    schedulers = [{"start_factor": 0.1, "param_name": "lr", "begin": 0, "end": 1, "by_epoch": True,
                   "base_values": [0.1], "last_step": 0, "_global_step": 2, "_last_value": [0.01]}]
    return {"meta": {**released["meta"], "experiment_name": "byol", "time": "20240101_000000"},
            "state_dict": released["state_dict"], "message_hub": hub,
            "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                          "param_groups": [{"lr": 0.01, "momentum": 0.9, "params": [0]}]},
            "param_schedulers": schedulers}


@pytest.mark.parametrize("protocol", [2, 4])
def test_mmengine_training_checkpoint_converts_and_its_log_buffers_stay_inert(
        protocol, online, target, expected, tmp_path, capsys, monkeypatch):
    """torch.save's default protocol 2 writes HistoryBuffer.min as ``builtins.getattr(HistoryBuffer,
    "min")``, protocol 4 by its qualified name: both read as the function's name, nothing called."""
    marker = tmp_path / "ran"
    _fake_module(monkeypatch, "mmengine.logging.history_buffer", HistoryBuffer=HistoryBuffer)
    path = tmp_path / "epoch_2.pth"
    torch.save(mmengine_training_file(online, target, marker), path, pickle_protocol=protocol)
    data = _pickle_of(path)  # the test exercises what mmengine's file holds:
    if protocol == 2:
        assert "__builtin__ getattr" in {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    else:
        assert b"HistoryBuffer.min" in data and b"getattr" not in data
    monkeypatch.delitem(sys.modules, "mmengine.logging.history_buffer")  # the reader needs no class
    _converts(path, "mmpretrain", expected, tmp_path, capsys, ("metadata", "optimizer", "scheduler", "training state"))
    got = safe_load.read(path)
    buffer = got["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buffer, unpickler.Unread) and buffer.kind == "mmengine.logging.history_buffer.HistoryBuffer"
    assert buffer.state["_log_history"].tolist() == [0.3, -0.1]
    methods = buffer.state["statistics_methods"]
    assert all(type(f) is unpickler.FunctionName for f in methods.values()) and "not read" in repr(methods["min"])
    assert not callable(methods["min"]) and not marker.exists()


def _getattr_pickle(owner: bytes, name: str) -> bytes:
    """A protocol-2 pickle of ``getattr(<owner>, name)``, ``owner`` the opcodes pushing it."""
    text = name.encode()
    return (b"\x80\x02c__builtin__\ngetattr\n" + owner + b"X" + len(text).to_bytes(4, "little") + text
            + b"\x86R.")


@pytest.mark.parametrize("owner, name", [
    (b"cmmengine.logging.history_buffer\nHistoryBuffer\n", "__init__"),  # a stand-in, not a listed function
    (b"cmmengine.logging.history_buffer\nHistoryBuffer\n", "__class__"),
    (b"cargparse\nNamespace\n", "min"),  # a listed name, on another class
    (b"ccollections\nOrderedDict\n", "fromkeys"),  # an allowed class that is no stand-in
    (b"}", "clear"),  # a dict's method
])
def test_getattr_is_refused_beyond_the_data_classes_functions(owner, name, tmp_path):
    path = tmp_path / "getattr.pkl"
    path.write_bytes(_getattr_pickle(owner, name))
    with pytest.raises(safe_load.UnsafeFileError, match=r"refused: loading it would call builtins\.getattr"):
        safe_load.read(path)


def test_getattr_with_a_default_is_refused(tmp_path):
    path = tmp_path / "getattr3.pkl"
    path.write_bytes(b"\x80\x02c__builtin__\ngetattr\n(cmmengine.logging.history_buffer\nHistoryBuffer\nX\x03\x00"
                     b"\x00\x00minNtR.")
    with pytest.raises(safe_load.UnsafeFileError, match=r"builtins\.getattr"):
        safe_load.read(path)


# ---------------------------------------------------------------------------- 2. yaox12/BYOL-PyTorch's trainer


def _yaox12_mlp(d_in: int) -> nn.Module:
    """model/basic_modules.py's MLP: l1, bn1, relu1, l2."""
    mlp = nn.Module()
    mlp.l1, mlp.bn1, mlp.relu1, mlp.l2 = nn.Linear(d_in, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)
    return mlp


def _yaox12_network(net: nn.Module) -> nn.Module:
    """EncoderwithProjection: encoder = Sequential(*resnet.children()[:-1]), projetion (sic)."""
    network = nn.Module()
    network.encoder = nn.Sequential(*list(copy.deepcopy(net).children())[:-1])
    network.projetion = _yaox12_mlp(512)
    return network


def yaox12_trainer_file(online, target, distributed: bool = True) -> dict:
    """trainer/byol_trainer.py's save_checkpoint: config, epoch, steps, model (BYOLModel's state_dict,
    under apex DDP's ``module.`` when distributed), optimizer, amp."""
    model = nn.Module()
    model.online_network, model.target_network = _yaox12_network(online), _yaox12_network(target)
    model.predictor = nn.Module()
    model.predictor.predictor = _yaox12_mlp(4)
    if distributed:
        wrapper = nn.Module()
        wrapper.module = model
        model = wrapper
    config = {"model": {"base_momentum": 0.99, "backbone": {"type": "resnet18", "pretrained": False}},
              "distributed": distributed, "checkpoint": {"save_epoch": 1}}
    return {"config": config, "epoch": 1, "steps": 10, "model": model.state_dict(),
            "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.3, "params": [0]}]},
            "amp": {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 1}}}


@pytest.mark.parametrize("distributed", [True, False])
def test_yaox12_trainer_checkpoint_converts(distributed, online, target, expected, tmp_path, capsys):
    obj = yaox12_trainer_file(online, target, distributed)
    prefix = "module." if distributed else ""
    assert f"{prefix}online_network.encoder.0.weight" in obj["model"]
    assert importers.detect(obj) == "byol-pytorch"
    torch.save(obj, tmp_path / "resnet18_1.pth.tar")
    _converts(tmp_path / "resnet18_1.pth.tar", "byol-pytorch", expected, tmp_path, capsys)
    dropped = importers.convert(obj, "src").dropped
    assert dropped[f"model.{prefix}online_network.projetion.l1.weight"] == "projector"
    assert dropped[f"model.{prefix}predictor.predictor.l2.bias"] == "predictor"
    assert dropped[f"model.{prefix}target_network.encoder.0.weight"] == "target network"
    assert dropped["optimizer"] == dropped["amp"] == "optimizer" and dropped["config"] == "config"


def test_yaox12_trainer_checkpoint_missing_tensor_is_named_as_the_file_names_it(online, target):
    obj = yaox12_trainer_file(online, target)
    del obj["model"]["module.online_network.encoder.6.1.bn2.running_var"]
    with pytest.raises(CheckpointError, match=r"layer3\.1\.bn2\.running_var \(model\.module\.online_network\."
                                              r"encoder\.6\.1\.bn2\.running_var\)"):
        importers.convert(obj, "src")


# ---------------------------------------------------------------------------- 3. lightly's tutorials


def test_lightly_tutorial_save_converts(online, expected, tmp_path, capsys):
    """``torch.save({"resnet18_parameters": backbone.state_dict()}, "model.pth")``, the backbone
    ``Sequential(*resnet.children()[:-1])``."""
    backbone = nn.Sequential(*list(copy.deepcopy(online).children())[:-1])
    obj = {"resnet18_parameters": backbone.state_dict()}
    assert importers.detect(obj) == "lightly"
    torch.save(obj, tmp_path / "model.pth")
    _converts(tmp_path / "model.pth", "lightly", expected, tmp_path, capsys)
    assert importers.detect({"resnet18_parameters": backbone.state_dict(), "other": torch.zeros(1)}) is None
    assert importers.detect({"weights": backbone.state_dict()}) is None


# ---------------------------------------------------------------------------- 4. lucidrains' byol-pytorch


def _lucidrains_mlp(d_in: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))


def lucidrains_learner(net: nn.Module, target_net: nn.Module | None) -> nn.Module:
    """``BYOL(net, ...)`` after its first forward: ``net``, ``online_encoder`` (NetWrapper: the same
    ``net``, and the projector, here with simplicial embeddings: ``Sequential(Sequential(Linear,
    BatchNorm1d), SEM, MLP)``), ``online_predictor`` and, with momentum, ``target_encoder`` (a deep
    copy of ``online_encoder``, here given other weights as training makes them)."""
    learner = nn.Module()
    learner.net = copy.deepcopy(net)
    learner.online_encoder = nn.Module()
    learner.online_encoder.net = learner.net
    learner.online_encoder.projector = nn.Sequential(nn.Sequential(nn.Linear(512, 16), nn.BatchNorm1d(16)),
                                                     nn.Softmax(-1), _lucidrains_mlp(16))
    learner.online_predictor = _lucidrains_mlp(4)
    if target_net is not None:
        learner.target_encoder = copy.deepcopy(learner.online_encoder)
        learner.target_encoder.net = copy.deepcopy(target_net)
    return learner


@pytest.mark.parametrize("momentum", [True, False])
def test_lucidrains_learner_state_dict_converts(momentum, online, target, expected, tmp_path, capsys):
    obj = lucidrains_learner(online, target if momentum else None).state_dict()
    assert {"net.conv1.weight", "online_encoder.net.conv1.weight", "online_encoder.projector.0.0.weight",
            "online_predictor.3.bias", "net.fc.weight"} <= set(obj)
    assert ("target_encoder.net.conv1.weight" in obj) == momentum
    assert importers.detect(obj) == "lucidrains"
    torch.save(obj, tmp_path / "learner.pt")
    _converts(tmp_path / "learner.pt", "lucidrains", expected, tmp_path, capsys,
              ("projector", "predictor", "duplicate of online_encoder.net") + (("target network",) if momentum else ()))


def test_lucidrains_learner_whose_two_nets_differ_is_refused(online, target):
    obj = lucidrains_learner(online, target).state_dict()
    obj["net.layer1.0.conv1.weight"] = obj["net.layer1.0.conv1.weight"] + 1
    with pytest.raises(CheckpointError, match=r"net\.layer1\.0\.conv1\.weight differs"):
        importers.convert(obj, "src")


# ---------------------------------------------------------------------------- 5. a torchvision state_dict


def test_plain_torchvision_state_dict_converts(online, expected, tmp_path, capsys):
    """``torch.save(resnet.state_dict(), path)`` (byol-pytorch's own trainer saves its net so): converted,
    fc dropped; detect() still names no project for it."""
    obj = dict(online.state_dict())
    assert importers.detect(obj) is None
    torch.save(obj, tmp_path / "resnet18.pth")
    _converts(tmp_path / "resnet18.pth", "torchvision", expected, tmp_path, capsys, ("classifier",))
    assert importers.convert(_encoder_state(online), "src", "torchvision").dropped == {}
    with pytest.raises(CheckpointError, match="no known checkpoint layout"):
        importers.convert({**obj, "extra.weight": torch.zeros(1)}, "src")


# ---------------------------------------------------------------------------- 6. JAX arrays


def _jax_reconstruct_array(fun, args, arr_state, aval_state):
    """Stands for ``jax._src.array._reconstruct_array``; leaves a marker if called."""
    open(_jax_reconstruct_array.marker, "w").close()


class _JaxPickler(pickle.Pickler):
    """Writes every numpy array as jax 0.4 and later pickles a ``jax.Array`` (``ArrayImpl.__reduce__``,
    seen with jax 0.10.2 under pickle and dill alike): ``_reconstruct_array(numpy's _reconstruct, its
    arguments, the numpy array's state, {"weak_type": False})``."""

    def reducer_override(self, obj):
        if type(obj) is np.ndarray:
            fun, args, state = obj.__reduce__()
            return _jax_reconstruct_array, (fun, args, state, {"weak_type": False})
        return NotImplemented


def _jax_pickle(obj) -> bytes:
    f = io.BytesIO()
    _JaxPickler(f, protocol=2).dump(obj)
    return f.getvalue()


def test_deepmind_checkpoint_with_jax_arrays_converts_without_jax(tmp_path, monkeypatch):
    """DeepMind's checkpointer on current JAX: the RNG key (and any leaf not fetched to numpy) pickles
    as a jax array; read as the numpy array it holds, jax never imported or called."""
    dm = pytest.importorskip("test_importers_deepmind")
    _jax_reconstruct_array.marker = str(tmp_path / "ran")
    _fake_module(monkeypatch, "jax._src.array", _reconstruct_array=_jax_reconstruct_array)
    params, bn_state = dm.to_haiku(dm.random_state("resnet50", seed=2), "res_net50")
    path = tmp_path / "checkpoint.pkl"
    path.write_bytes(_jax_pickle(dm.release(params, bn_state, 2048)))
    assert "jax._src.array _reconstruct_array" in {a for op, a, _ in pickletools.genops(path.read_bytes())
                                                   if op.name == "GLOBAL"}
    for name in [n for n in sys.modules if n == "jax" or n.startswith("jax.")]:
        monkeypatch.delitem(sys.modules, name)
    obj = load(path)
    assert "jax" not in sys.modules and not (tmp_path / "ran").exists()
    assert type(obj["rng"]) is np.ndarray and obj["rng"].tolist() == [0, 42]
    assert importers.detect(obj) == "deepmind"
    converted = importers.convert(obj, str(path))
    assert len(converted.state) == 318 and converted.padding == "same"
    x = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(4))
    mean, std = torch.tensor(dm.MEAN).view(1, 3, 1, 1), torch.tensor(dm.STD).view(1, 3, 1, 1)
    ref = dm.haiku_forward(params, bn_state, "res_net50", ((x - mean) / std).double()).float()
    torch.testing.assert_close(load_feature_extractor(path)(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("change, refusal", [
    (lambda fun, args, state, aval: (codecs.encode, ("x", "latin1"), None, aval), "jax array rebuilt by _codecs_encode"),
    (lambda fun, args, state, aval: (fun, args, state, {"weak_type": False, "sharding": "x"}), "other arguments"),
    (lambda fun, args, state, aval: (fun, args, state, {"weak_type": "yes"}), "other arguments"),
])
def test_jax_reconstruction_is_taken_only_around_numpy_data(change, refusal, tmp_path, monkeypatch):
    _jax_reconstruct_array.marker = str(tmp_path / "ran")
    _fake_module(monkeypatch, "jax._src.array", _reconstruct_array=_jax_reconstruct_array)

    class Forged:
        def __reduce__(self):
            fun, args, state = np.arange(3.0).__reduce__()
            return _jax_reconstruct_array, change(fun, args, state, {"weak_type": False})

    path = tmp_path / "forged.pkl"
    path.write_bytes(pickle.dumps({"w": Forged()}, protocol=2))
    with pytest.raises(safe_load.UnsafeFileError, match=refusal):
        safe_load.read(path)
    assert not (tmp_path / "ran").exists()


def test_function_names_stay_unchangeable(tmp_path):
    """The FunctionName objects are shared by every read: a file cannot set state on them."""
    function = unpickler.DATA_FUNCTIONS[("mmengine.logging.history_buffer.HistoryBuffer", "min")]
    path = tmp_path / "build.pkl"
    path.write_bytes(b"\x80\x02cmmengine.logging.history_buffer\nHistoryBuffer.min\n}X\x04\x00\x00\x00nameX\x01"
                     b"\x00\x00\x00xsb.")
    with pytest.raises(safe_load.UnsafeFileError, match="setting the state of"):
        safe_load.read(path)
    assert function.name.endswith("HistoryBuffer.min")
    with pytest.raises(AttributeError):
        function.name = "x"
