"""Importers of the mmpretrain, solo-learn, lightly and VISSL BYOL layouts (byol_fast/layouts).

Each file is built from a seeded torchvision resnet18 (batch-norm statistics perturbed, so a wrong or
missing buffer shows in the features) in the exact key structure the project's code writes, with
its non-backbone parts present; the features of the imported backbone must equal those of the
source network, computed here independently.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from byol_fast import convert as convert_cli
from byol_fast.weights import importers
from byol_fast.weights.checkpoint import PRETRAIN
from byol_fast.errors import CheckpointError
from byol_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from byol_fast.weights.encoder_file import load_feature_extractor

MINE = ("mmpretrain", "solo-learn", "lightly", "vissl")


# ---------------------------------------------------------------------------- source networks


def _resnet(seed: int, arch=torchvision.models.resnet18) -> nn.Module:
    torch.manual_seed(seed)
    net = arch()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.num_batches_tracked.fill_(seed + 11)
    return net


@pytest.fixture(scope="module")
def online() -> nn.Module:
    return _resnet(0)


@pytest.fixture(scope="module")
def target() -> nn.Module:  # the momentum network: other weights, which must not be picked
    return _resnet(1)


def _encoder_state(net: nn.Module) -> dict:
    return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _mlp(prefix: str, names=("0", "1", "3"), width: int = 4) -> dict:
    """A small Linear, BatchNorm1d, (ReLU), Linear under ``prefix`` (names of the two Linears and the BN)."""
    fc0, bn, fc1 = names
    return {f"{prefix}{fc0}.weight": torch.randn(width, 512), f"{prefix}{fc0}.bias": torch.randn(width),
            f"{prefix}{bn}.weight": torch.ones(width), f"{prefix}{bn}.bias": torch.zeros(width),
            f"{prefix}{bn}.running_mean": torch.zeros(width), f"{prefix}{bn}.running_var": torch.ones(width),
            f"{prefix}{bn}.num_batches_tracked": torch.tensor(3), f"{prefix}{fc1}.weight": torch.randn(2, width),
            f"{prefix}{fc1}.bias": torch.randn(2)}


def _lightning(state: dict) -> dict:
    """A PyTorch Lightning checkpoint around ``state``."""
    return {"epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.1.0", "state_dict": state,
            "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}},
            "callbacks": {"ModelCheckpoint": {"best_model_score": None}},
            "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros(2)}},
                                  "param_groups": [{"lr": 0.1, "params": [0]}]}],
            "lr_schedulers": [{"last_epoch": 3, "base_lrs": [0.1]}], "hparams_name": "kwargs",
            "hyper_parameters": {"batch_size_per_device": 256, "num_classes": 1000}}


# ---------------------------------------------------------------------------- the layouts


def mmpretrain_file(online: nn.Module, target: nn.Module) -> dict:
    """mmpretrain / mmselfsup 1.x BYOL: backbone, neck (NonLinearNeck fc0/bn0/fc1), head.predictor,
    target_net = CosineEMA(Sequential(backbone, neck)) -> target_net.module.{0,1}.*, target_net.steps."""
    neck = _mlp("neck.", ("fc0", "bn0", "fc1"))
    state = {**_prefixed("backbone.", _encoder_state(online)), **neck,
             **_mlp("head.predictor.", ("fc0", "bn0", "fc1")), "target_net.steps": torch.tensor(1000),
             **_prefixed("target_net.module.0.", _encoder_state(target)),
             **{"target_net.module.1." + k[len("neck."):]: v for k, v in neck.items()}}
    return {"meta": {"mmengine_version": "0.8.4", "mmpretrain_version": "1.0.0", "dataset_meta": {},
                     "epoch": 200, "iter": 62600, "seed": 0, "cfg": "model = dict(type='BYOL')"},
            "state_dict": state}


def mmselfsup0_file(online: nn.Module, target: nn.Module) -> dict:
    """mmselfsup 0.x BYOL: online_net = Sequential(backbone, neck), target_net likewise, and the aliases
    backbone = online_net[0], neck = online_net[1] (so the online tensors appear twice)."""
    backbone, neck = _encoder_state(online), _mlp("", ("fc0", "bn0", "fc1"))
    state = {**_prefixed("online_net.0.", backbone), **_prefixed("online_net.1.", neck),
             **_prefixed("target_net.0.", _encoder_state(target)), **_prefixed("target_net.1.", neck),
             **_prefixed("backbone.", backbone), **_prefixed("neck.", neck),
             **_mlp("head.predictor.", ("fc0", "bn0", "fc1"))}
    return {"meta": {"mmcv_version": "1.4.7", "epoch": 200, "iter": 1000}, "state_dict": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 4.8, "params": [0]}]}}


def solo_learn_file(online: nn.Module, target: nn.Module, legacy: bool = False) -> dict:
    """solo-learn BYOL (Lightning .ckpt): backbone (torchvision, fc Identity), classifier,
    momentum_backbone, projector, momentum_projector, predictor; ``encoder``/``momentum_encoder``
    before December 2021."""
    b, mb = ("encoder.", "momentum_encoder.") if legacy else ("backbone.", "momentum_backbone.")
    state = {**_prefixed(b, _encoder_state(online)), "classifier.weight": torch.randn(10, 512),
             "classifier.bias": torch.randn(10), **_prefixed(mb, _encoder_state(target)),
             **_mlp("projector."), **_mlp("momentum_projector."), **_mlp("predictor.")}
    return _lightning(state)


def _sequential(net: nn.Module) -> nn.Sequential:
    return nn.Sequential(*list(net.children())[:-1])  # lightly's examples: fc cut off


class _Head(nn.Module):  # lightly's ProjectionHead: self.layers = Sequential(...)
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(512, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def lightly_backbone_file(online: nn.Module, target: nn.Module) -> dict:
    """torch.save(backbone.state_dict()) of lightly's Sequential(*resnet.children()[:-1])."""
    return dict(_sequential(copy.deepcopy(online)).state_dict())


def lightly_model_file(online: nn.Module, target: nn.Module) -> dict:
    """The whole BYOL module of lightly's examples/pytorch/byol.py, state_dict saved."""
    model = nn.Module()
    model.backbone = _sequential(copy.deepcopy(online))
    model.projection_head = _Head()
    model.prediction_head = _Head()
    model.backbone_momentum = _sequential(copy.deepcopy(target))
    model.projection_head_momentum = _Head()
    return dict(model.state_dict())


def lightly_benchmark_file(online: nn.Module, target: nn.Module) -> dict:
    """lightly's benchmarks/imagenet/resnet50/byol.py Lightning checkpoint: torchvision backbone names."""
    model = nn.Module()
    model.backbone = copy.deepcopy(online)
    model.backbone.fc = nn.Identity()
    model.projection_head = _Head()
    model.prediction_head = _Head()
    model.teacher_backbone = copy.deepcopy(target)
    model.teacher_backbone.fc = nn.Identity()
    model.teacher_projection_head = _Head()
    model.online_classifier = nn.Module()
    model.online_classifier.classification_head = nn.Linear(512, 10)
    return _lightning(dict(model.state_dict()))


def lightly_benchmark_old_file(online: nn.Module, target: nn.Module) -> dict:
    """The same benchmark before 2024-02-22: student_* online, backbone/projection_head the teacher."""
    model = nn.Module()
    model.backbone = copy.deepcopy(target)
    model.backbone.fc = nn.Identity()
    model.projection_head = _Head()
    model.student_backbone = copy.deepcopy(online)
    model.student_backbone.fc = nn.Identity()
    model.student_projection_head = _Head()
    model.student_prediction_head = _Head()
    model.online_classifier = nn.Module()
    model.online_classifier.classification_head = nn.Linear(512, 10)
    return _lightning(dict(model.state_dict()))


def _trunk(net: nn.Module) -> nn.Module:
    """VISSL's ResNeXt trunk: the torchvision modules in a ModuleDict called _feature_blocks."""
    trunk = nn.Module()
    net = copy.deepcopy(net)
    trunk._feature_blocks = nn.ModuleDict({
        "conv1": net.conv1, "bn1": net.bn1, "conv1_relu": net.relu, "maxpool": net.maxpool,
        "layer1": net.layer1, "layer2": net.layer2, "layer3": net.layer3, "layer4": net.layer4,
        "avgpool": net.avgpool, "flatten": nn.Flatten(1)})
    return trunk


def vissl_file(online: nn.Module, target: nn.Module) -> dict:
    """A VISSL checkpoint (CheckpointHook): classy_state_dict.base_model.model.{trunk, heads}; the BYOL
    branch keeps the target network in the loss's state."""
    heads = nn.ModuleList([nn.Module(), nn.Module()])
    heads[0].clf = _Head().layers
    heads[1].clf = _Head().layers
    target_model = nn.Module()
    target_model.trunk = _trunk(target)
    target_model.heads = nn.ModuleList([heads[0]])
    return {"phase_idx": 4, "iteration": 500, "iteration_num": 500, "train_phase_idx": 4,
            "loss": _prefixed("target_network.", dict(target_model.state_dict())),
            "classy_state_dict": {
                "train": True,
                "base_model": {"model": {"trunk": dict(_trunk(online).state_dict()), "heads": dict(heads.state_dict())},
                               "meta": {"trunk": {}, "heads": []}},
                "meters": [], "optimizer": {"state": {}, "param_groups": [{"lr": 0.3, "params": [0]}]},
                "phase_idx": 4, "train_phase_idx": 4, "num_updates": 500, "losses": [0.5], "hooks": {},
                "loss": {}}}


FILES = {  # id -> (builder, layout, reasons the report must name)
    "mmpretrain": (mmpretrain_file, "mmpretrain", ("projector", "predictor", "target network", "metadata")),
    "mmselfsup-0.x": (mmselfsup0_file, "mmpretrain", ("projector", "predictor", "target network", "optimizer")),
    "solo-learn": (solo_learn_file, "solo-learn",
                   ("projector", "predictor", "target network", "classifier head", "optimizer")),
    "solo-learn-legacy": (lambda o, t: solo_learn_file(o, t, legacy=True), "solo-learn",
                          ("projector", "predictor", "target network", "classifier head")),
    "lightly-backbone": (lightly_backbone_file, "lightly", ()),
    "lightly": (lightly_model_file, "lightly", ("projector", "predictor", "target network")),
    "lightly-benchmark": (lightly_benchmark_file, "lightly",
                          ("projector", "predictor", "target network", "classifier head", "optimizer")),
    "lightly-benchmark-old": (lightly_benchmark_old_file, "lightly",
                              ("projector", "predictor", "target network", "classifier head")),
    "vissl": (vissl_file, "vissl", ("projector", "predictor", "target network", "optimizer")),
}


# ---------------------------------------------------------------------------- tests


def _images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _expected(net: nn.Module) -> torch.Tensor:
    net = copy.deepcopy(net)
    net.fc = nn.Identity()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return net.eval()((_images() - mean) / std)


@pytest.fixture(scope="module")
def expected(online, target) -> torch.Tensor:
    features = _expected(online)
    assert not torch.allclose(_expected(target), features)  # picking the target network would show
    return features


@pytest.mark.parametrize("name", list(FILES))
def test_imports_the_online_backbone(name, online, target, expected, tmp_path, capsys):
    build, layout, reasons = FILES[name]
    obj = build(online, target)
    assert importers.detect(obj) == layout
    for other in MINE:  # no other importer claims it
        assert importers._module(other).detect(obj) == (other == layout), other
    src, out = tmp_path / "src.ckpt", tmp_path / "encoder.pt"
    torch.save(obj, src)
    torch.testing.assert_close(load_feature_extractor(src)(_images()), expected)

    if name in MINE:  # each layout's main file also through python -m byol_fast.convert (the variants: the report)
        assert convert_cli.main([str(src), "--out", str(out)]) == 0
        report = capsys.readouterr().out
        torch.testing.assert_close(load_feature_extractor(out)(_images()), expected)
    else:
        report = importers.convert(obj, str(src)).report()
    assert report.startswith(f"{layout}: mapped 120 backbone tensors")  # resnet18: 60 parameters + 60 BN buffers
    for reason in reasons:
        assert reason in report, (reason, report)


def test_dropped_names_every_left_out_key(online, target):
    obj = mmpretrain_file(online, target)
    converted = importers.convert(obj, "mm.pth")
    state = obj["state_dict"]
    assert set(converted.dropped) == {"meta"} | {k for k in state if not k.startswith("backbone.")}
    assert converted.dropped["neck.fc0.weight"] == "projector"
    assert converted.dropped["head.predictor.fc1.bias"] == "predictor"
    assert converted.dropped["target_net.module.0.conv1.weight"] == "target network"
    solo = importers.convert(solo_learn_file(online, target), "solo.ckpt")
    assert solo.dropped["classifier.weight"] == "classifier head"
    assert solo.dropped["optimizer_states"] == "optimizer"
    assert solo.dropped["momentum_projector.0.weight"] == "target network"
    vissl = importers.convert(vissl_file(online, target), "vissl.torch")
    assert vissl.dropped["classy_state_dict.base_model.model.heads.0.clf.0.weight"] == "projector"
    assert vissl.dropped["classy_state_dict.base_model.model.heads.1.clf.3.bias"] == "predictor"
    assert vissl.dropped["loss.target_network.trunk._feature_blocks.conv1.weight"] == "target network"


def test_detect_refuses_other_files(online):
    bare = _encoder_state(online)
    assert importers.detect(bare) is None
    assert importers.detect(dict(online.state_dict())) is None  # with fc.*
    ours = {"kind": PRETRAIN, "online": _prefixed("encoder.", bare), "target": _prefixed("encoder.", bare),
            "config": {"model": {"backbone": "resnet18"}}, "step": 3}
    assert importers.detect(ours) is None
    assert importers.detect(_prefixed("backbone.", bare)) is None
    assert importers.detect({"state_dict": _prefixed("backbone.", bare)}) is None  # prefix only: whose?
    for obj in ([1, 2], "x", None, {}, {"state_dict": 3}, {"classy_state_dict": {"base_model": 1}}):
        assert importers.detect(obj) is None
        for name in MINE:
            assert not importers._module(name).detect(obj)


def test_bare_torchvision_state_dict_still_loads(online, expected, tmp_path):
    torch.save(dict(online.state_dict()), tmp_path / "tv.pt")
    torch.testing.assert_close(load_feature_extractor(tmp_path / "tv.pt")(_images()), expected)


REMOVE = {"mmpretrain": ("backbone.", "state_dict"), "solo-learn": ("backbone.", "state_dict"),
          "lightly": ("backbone.", None), "vissl": ("_feature_blocks.", "vissl")}


@pytest.mark.parametrize("name", list(REMOVE))
def test_missing_backbone_tensor_is_named(name, online, target, tmp_path):
    obj = FILES[name][0](online, target)
    prefix, where = REMOVE[name]
    state = obj["state_dict"] if where == "state_dict" else (
        obj["classy_state_dict"]["base_model"]["model"]["trunk"] if where == "vissl" else obj)
    del state[prefix + ("6.1.bn2.running_var" if name == "lightly" else "layer3.1.bn2.running_var")]
    with pytest.raises(CheckpointError, match=r"layer3\.1\.bn2\.running_var"):
        importers.convert(obj, "src")
    torch.save(obj, tmp_path / "src.pth")  # and end to end, from a file
    with pytest.raises(CheckpointError, match=r"layer3\.1\.bn2\.running_var"):
        load_feature_extractor(tmp_path / "src.pth")


def test_backbone_key_without_torchvision_name_is_unmapped(online, target):
    obj = mmpretrain_file(online, target)
    obj["state_dict"]["backbone.stem.0.conv.weight"] = torch.zeros(32, 3, 3, 3)  # mmpretrain's deep stem
    with pytest.raises(CheckpointError, match=r"no torchvision name: backbone\.stem\.0\.conv\.weight"):
        importers.convert(obj, "src")
    obj = lightly_backbone_file(online, target)
    obj["9.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"no torchvision name: 9\.weight"):
        importers.convert(obj, "src")


def test_solo_learn_cifar_stem_is_refused(online, target, tmp_path, capsys):
    cifar = copy.deepcopy(online)
    cifar.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)  # solo-learn's CIFAR stem
    cifar.maxpool = nn.Identity()
    obj = solo_learn_file(cifar, cifar)
    assert importers.detect(obj) == "solo-learn"
    torch.save(obj, tmp_path / "cifar.ckpt")
    with pytest.raises(CheckpointError, match=r"CIFAR stem \(conv1\.weight of shape \(64, 3, 3, 3\)"):
        load_feature_extractor(tmp_path / "cifar.ckpt")
    assert convert_cli.main([str(tmp_path / "cifar.ckpt"), "--out", str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "(64, 3, 3, 3)" in err and "CIFAR" in err, err
    assert not (tmp_path / "out.pt").exists()
