"""The importers of two releases whose backbone names are not torchvision's as they stand:
yaox12/BYOL-PyTorch (``online_backbone``, DDP's ``module.`` prefix) and PaddlePaddle/PASSL
(``byol_r50_300.pdparams``: a plain pickle of numpy arrays under Paddle's names).

Each test builds a small file in the project's own key structure from a seeded torchvision
``resnet18`` (batch-norm statistics perturbed, so that using the wrong ones shows), with the other
parts (projector, predictor, target network, optimizer state) present as small tensors and the
target network holding different weights, so that mapping the wrong tower shows too.
"""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from byol_fast.weights import checkpoint as ckpt
from byol_fast.weights import importers
from byol_fast.errors import CheckpointError
from byol_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from byol_fast.convert import main as convert_main
from byol_fast.weights.encoder_file import load_feature_extractor
from byol_fast.weights.importers import byol_pytorch, passl

SIZE = 48  # pixels: resnet18 at this size is a few milliseconds on the CPU


def _resnet18(seed: int) -> nn.Module:
    """A torchvision resnet18 with random weights and batch-norm parameters and statistics far from
    their initial 1/0, so that features depend on every one of them."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.num_batches_tracked.fill_(1234)
    return net


def _backbone(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("fc.")}


def _images() -> torch.Tensor:
    return torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


def _reference_features(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The source network's features, computed here without byol_fast."""
    net = copy.deepcopy(net)
    net.fc = nn.Identity()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return net.eval()((images - mean) / std)


@pytest.fixture(scope="module")
def nets():
    return _resnet18(0), _resnet18(100)  # online, target


# ---------------------------------------------------------------------------- the two layouts


def _mlp_torch(prefix: str, d_in: int, hidden: int, d_out: int) -> dict[str, torch.Tensor]:
    """BYOL-PyTorch's MLP (l1, bn1, relu1, l2) as a DDP-wrapped state_dict."""
    return {f"{prefix}l1.weight": torch.randn(hidden, d_in), f"{prefix}l1.bias": torch.randn(hidden),
            f"{prefix}bn1.weight": torch.rand(hidden), f"{prefix}bn1.bias": torch.randn(hidden),
            f"{prefix}bn1.running_mean": torch.randn(hidden), f"{prefix}bn1.running_var": torch.rand(hidden),
            f"{prefix}bn1.num_batches_tracked": torch.tensor(5), f"{prefix}l2.weight": torch.randn(d_out, hidden),
            f"{prefix}l2.bias": torch.randn(d_out)}


def byol_pytorch_file(path, online: nn.Module, target: nn.Module, drop: str | None = None):
    """yaox12/BYOL-PyTorch's release: the online and target backbones, projections and predictor saved
    as separate state_dicts of the DDP-wrapped modules (every key under ``module.``), torch.save'd."""
    backbone = {f"module.{k}": v for k, v in _backbone(online).items()}
    if drop:
        del backbone[drop]
    obj = {
        "online_backbone": backbone,
        "online_projection": _mlp_torch("module.", 512, 16, 8),
        "predictor": _mlp_torch("module.predictor.", 8, 16, 8),
        "target_backbone": {f"module.{k}": v for k, v in _backbone(target).items()},
        "target_projection": _mlp_torch("module.", 512, 16, 8),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.3, "momentum": 0.9, "params": [0, 1]}]},
        "epoch": 300,
    }
    torch.save(obj, path)
    return path


def _paddle_names(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A torchvision backbone state_dict under Paddle's names: batch-norm ``_mean``/``_variance``, no
    ``num_batches_tracked``; numpy float32 arrays (as PASSL's checkpoint hook writes them)."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = key.replace("running_mean", "_mean").replace("running_var", "_variance")
        out[key] = value.numpy().astype(np.float32)
    return out


def _neck_paddle(prefix: str, d_in: int, hidden: int, d_out: int, rng) -> dict[str, np.ndarray]:
    """PASSL's NonLinearNeckV2 (mlp: Linear, BatchNorm1D, ReLU, Linear); Paddle Linear weights are [in, out]."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {f"{prefix}mlp.0.weight": f(d_in, hidden), f"{prefix}mlp.0.bias": f(hidden),
            f"{prefix}mlp.1.weight": f(hidden), f"{prefix}mlp.1.bias": f(hidden),
            f"{prefix}mlp.1._mean": f(hidden), f"{prefix}mlp.1._variance": np.abs(f(hidden)),
            f"{prefix}mlp.3.weight": f(hidden, d_out), f"{prefix}mlp.3.bias": f(d_out)}


def passl_model(online: nn.Module, target: nn.Module) -> dict[str, np.ndarray]:
    """PASSL's BYOL ``model.state_dict()`` in its order: towers (online ResNet + neck, target ResNet +
    neck), predictor, classifier, then ``backbone`` (the alias of towers[0][0], written again)."""
    rng = np.random.default_rng(3)
    online_p, target_p = _paddle_names(_backbone(online)), _paddle_names(_backbone(target))
    model = {f"towers.0.0.{k}": v for k, v in online_p.items()}
    model.update(_neck_paddle("towers.0.1.", 512, 16, 8, rng))
    model.update({f"towers.1.0.{k}": v for k, v in target_p.items()})
    model.update(_neck_paddle("towers.1.1.", 512, 16, 8, rng))
    model.update(_neck_paddle("predictor.", 8, 16, 8, rng))
    model["classifier.weight"] = rng.standard_normal((512, 10)).astype(np.float32)
    model["classifier.bias"] = np.zeros(10, np.float32)
    model.update({f"backbone.{k}": v for k, v in online_p.items()})
    return model


def passl_file(path, online: nn.Module, target: nn.Module, protocol: int = 2, drop: tuple[str, ...] = ()):
    """PASSL's checkpoint hook: ``pickle.dump`` of epoch, state_dict, optimizer and scheduler states
    (``lr_sheduer``, sic), arrays as numpy."""
    model = passl_model(online, target)
    for key in drop:
        del model[key]
    obj = {"epoch": 300, "state_dict": model,
           "optimizer": {"conv2d_0.w_0_velocity_0": np.zeros((4, 3), np.float32),
                         "LR_Scheduler": {"last_epoch": 93835, "last_lr": 4.8}},
           "lr_sheduer": {"last_epoch": 93835, "last_lr": 4.8}}
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


# ---------------------------------------------------------------------------- detection


def test_detect_names_each_layout(tmp_path, nets):
    online, target = nets
    src_t = byol_pytorch_file(tmp_path / "resnet18_byol_imagenet2012.pth.tar", online, target)
    src_p = passl_file(tmp_path / "byol_r18_300.pdparams", online, target)
    obj_t, obj_p = ckpt.load(src_t), ckpt.load(src_p)
    assert isinstance(obj_p["state_dict"]["backbone.conv1.weight"], np.ndarray)  # read as numpy, no Paddle
    assert importers.detect(obj_t) == "byol-pytorch"
    assert importers.detect(obj_p) == "passl"
    assert not passl.detect(obj_t) and not byol_pytorch.detect(obj_p)


def test_detect_refuses_other_files(tmp_path, nets):
    online, _ = nets
    bare = online.state_dict()  # a torchvision state_dict
    exported = tmp_path / "encoder.pt"
    ckpt.save_encoder(_backbone(online), exported, IMAGENET_MEAN, IMAGENET_STD)
    ours = {"kind": ckpt.PRETRAIN, "online": {f"encoder.{k}": v for k, v in bare.items()},
            "target": {f"encoder.{k}": v for k, v in bare.items()}, "config": {}, "step": 3}
    ddp_bare = {f"module.{k}": v for k, v in bare.items()}
    only_online = {"online_backbone": {f"module.{k}": v for k, v in bare.items()}}  # no target: not the release
    paddle_resnet = _paddle_names(_backbone(online))  # extracted weights, not a BYOL checkpoint
    for module in (byol_pytorch, passl):
        for obj in (bare, ckpt.load(exported), ours, ddp_bare, only_online, paddle_resnet, {}, {"state_dict": []}):
            assert module.detect(obj) is False, (module.__name__, sorted(obj)[:3])
        for obj in ([1, 2], "online_backbone", None, torch.zeros(3)):
            assert module.detect(obj) is False


# ---------------------------------------------------------------------------- conversion


def _check_features(src, out, online):
    images = _images()
    expected = _reference_features(online, images)
    torch.testing.assert_close(load_feature_extractor(src)(images), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(load_feature_extractor(out)(images), expected, rtol=1e-4, atol=1e-5)
    written = torch.load(out, weights_only=True)
    for key, value in _backbone(online).items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(written[key], value, rtol=0, atol=0, msg=key)
    return written


def _convert_and_check(src, tmp_path, capsys, online, layout: str, dropped_for: tuple[str, ...]):
    """``convert`` of ``src`` reports the layout, the 120 tensors of resnet18's backbone (20 convs + 20
    batch norms x 5) and why each other part was dropped; the written encoder gives the source's
    features. Returns the written state."""
    out = tmp_path / "encoder.pt"
    assert convert_main([str(src), "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert f"{layout}: mapped 120 backbone tensors" in report
    for why in dropped_for:
        assert why in report
    return _check_features(src, out, online)


def test_byol_pytorch_converts_the_online_backbone(tmp_path, nets, capsys):
    online, target = nets
    src = byol_pytorch_file(tmp_path / "resnet18_byol_imagenet2012.pth.tar", online, target)
    written = _convert_and_check(src, tmp_path, capsys, online, "byol-pytorch",
                                 ("projector", "predictor", "target network", "optimizer"))
    assert int(written["bn1.num_batches_tracked"]) == 1234  # torch's own counter, carried over


def _converted(src, layout: str, online):
    """(the file's object, its conversion), checked to be ``layout``'s, torchvision-padded, with every
    tensor of the online backbone mapped and nothing else."""
    obj = ckpt.load(src)
    converted = importers.convert(obj, str(src))
    assert converted.layout == layout and converted.padding == "torchvision" and not converted.unmapped
    assert set(converted.state) == set(_backbone(online))
    return obj, converted


def test_byol_pytorch_dropped(tmp_path, nets):
    online, target = nets
    obj, converted = _converted(byol_pytorch_file(tmp_path / "r.pth.tar", online, target), "byol-pytorch", online)
    dropped = converted.dropped
    assert dropped["target_backbone.module.conv1.weight"] == "target network"
    assert dropped["target_projection.module.l1.weight"] == "target network"
    assert dropped["online_projection.module.l2.bias"] == "projector"
    assert dropped["predictor.module.predictor.l1.weight"] == "predictor"
    assert dropped["optimizer"] == "optimizer" and dropped["epoch"] == "training state"
    # every source tensor outside the online backbone is accounted for
    for entry in ("online_projection", "predictor", "target_backbone", "target_projection"):
        assert all(f"{entry}.{k}" in dropped for k in obj[entry])
    assert "dropped" in converted.report() and "target network" in converted.report()


@pytest.mark.parametrize("protocol", [2, 4])
def test_passl_converts_the_online_backbone(tmp_path, nets, capsys, protocol):
    online, target = nets
    src = passl_file(tmp_path / "byol_r18_300.pdparams", online, target, protocol)
    written = _convert_and_check(src, tmp_path, capsys, online, "passl",
                                 ("projector", "predictor", "target network", "optimizer", "classifier"))
    assert written["bn1.num_batches_tracked"].dtype == torch.int64 and int(written["bn1.num_batches_tracked"]) == 0


def test_passl_dropped_and_created(tmp_path, nets):
    online, target = nets
    obj, converted = _converted(passl_file(tmp_path / "byol_r18_300.pdparams", online, target), "passl", online)
    state = converted.state
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["layer1.0.conv1.weight"].dtype == torch.float32
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert len(counters) == 20  # one per batch norm of resnet18, created (Paddle has none)
    assert all(state[k].dtype == torch.int64 and state[k].dim() == 0 and int(state[k]) == 0 for k in counters)
    torch.testing.assert_close(state["layer2.0.downsample.1.running_var"], online.layer2[0].downsample[1].running_var)
    dropped = converted.dropped
    assert dropped["towers.0.0.conv1.weight"] == "duplicate of the online backbone"
    assert dropped["towers.0.1.mlp.0.weight"] == "projector"
    assert dropped["towers.1.0.layer4.1.bn2._variance"] == "target network"
    assert dropped["towers.1.1.mlp.3.bias"] == "target network"
    assert dropped["predictor.mlp.1._mean"] == "predictor"
    assert dropped["classifier.weight"] == "classifier"
    assert dropped["optimizer"] == "optimizer" and dropped["lr_sheduer"] == "lr scheduler"
    assert dropped["epoch"] == "training state"
    model = obj["state_dict"]
    mapped = {k for k in model if k.startswith("backbone.")}
    assert mapped | set(dropped) >= set(model)  # every source key mapped or dropped with a reason


def test_passl_bare_state_dict_from_paddle_save(tmp_path, nets):
    """``paddle.save(model.state_dict())``: the model's keys at the top level, plus Paddle's name table."""
    online, target = nets
    model = passl_model(online, target)
    model["StructuredToParameterName@@"] = {k: f"param_{i}" for i, k in enumerate(model)}
    src = tmp_path / "byol.pdparams"
    with open(src, "wb") as f:
        pickle.dump(model, f, protocol=4)
    obj = ckpt.load(src)
    assert importers.detect(obj) == "passl"
    converted = importers.convert(obj, str(src))
    assert converted.dropped["StructuredToParameterName@@"] == "Paddle name table"
    images = _images()
    torch.testing.assert_close(load_feature_extractor(src)(images), _reference_features(online, images),
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- refusals


def test_byol_pytorch_missing_tensor_is_named(tmp_path, nets, capsys):
    online, target = nets
    src = byol_pytorch_file(tmp_path / "r.pth.tar", online, target, drop="module.layer3.1.conv2.weight")
    with pytest.raises(CheckpointError, match=r"layer3\.1\.conv2\.weight"):
        importers.convert(ckpt.load(src), str(src))
    with pytest.raises(CheckpointError, match=r"layer3\.1\.conv2\.weight"):
        load_feature_extractor(src)
    assert convert_main([str(src), "--out", str(tmp_path / "out.pt")]) == 2
    assert "layer3.1.conv2.weight" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


def test_passl_missing_tensor_is_named(tmp_path, nets, capsys):
    online, target = nets
    # gone from both names of the online ResNet
    src = passl_file(tmp_path / "a.pdparams", online, target,
                     drop=("backbone.layer2.0.conv1.weight", "towers.0.0.layer2.0.conv1.weight"))
    with pytest.raises(CheckpointError, match=r"layer2\.0\.conv1\.weight"):
        importers.convert(ckpt.load(src), str(src))
    assert convert_main([str(src), "--out", str(tmp_path / "out.pt")]) == 2
    assert "layer2.0.conv1.weight" in capsys.readouterr().err
    # gone from the alias only: refused too, naming it
    src = passl_file(tmp_path / "b.pdparams", online, target, drop=("backbone.layer1.1.bn2._variance",))
    with pytest.raises(CheckpointError, match=r"backbone\.layer1\.1\.bn2\._variance"):
        importers.convert(ckpt.load(src), str(src))


def _alias_differs(model):
    model["towers.0.0.layer1.0.bn1.weight"] = model["towers.0.0.layer1.0.bn1.weight"] + 1


def _unknown_leaf(model):
    model["backbone.layer1.0.bn1._weird"] = np.zeros(64, np.float32)


@pytest.mark.parametrize("change,refusal", [
    (_alias_differs, r"towers\.0\.0\.layer1\.0\.bn1\.weight"),  # the alias differs from the tower it names
    (_unknown_leaf, r"no torchvision name: backbone\.layer1\.0\.bn1\._weird"),  # a backbone leaf with no torchvision name
])
def test_passl_files_that_do_not_fit_are_refused_naming_the_tensor(tmp_path, nets, change, refusal):
    online, target = nets
    src = tmp_path / "c.pdparams"
    model = passl_model(online, target)
    change(model)
    with open(src, "wb") as f:
        pickle.dump({"epoch": 1, "state_dict": model, "optimizer": {}, "lr_sheduer": {}}, f, protocol=2)
    with pytest.raises(CheckpointError, match=refusal):
        importers.convert(ckpt.load(src), str(src))
