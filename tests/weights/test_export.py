"""Export and the feature API, checked against torchvision's own ResNet."""
import dataclasses
import warnings

import pytest
import torch
import torchvision

from byol_fast import export
from byol_fast.weights import checkpoint
from byol_fast.errors import CheckpointError
from byol_fast.config import to_dict, Config
from byol_fast.weights.backbone_match import infer_backbone
from byol_fast.weights.encoder_file import load_encoder, load_feature_extractor, read_encoder_weights
from byol_fast.models.byol import BYOL
from conftest import SMALL

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def perturb(module, seed):
    """Move every parameter and BN statistic off its initial value, so that a load that silently
    fails (leaving a fresh network) cannot give the same features."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))
                if t.ndim == 1 and (t < 0).any():
                    t.abs_()  # keeps BN running_var positive


@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory):
    """A training checkpoint in the layout train.py writes; online and target differ."""
    torch.manual_seed(0)
    model = BYOL(SMALL)
    perturb(model.online, 1)
    perturb(model.target, 2)
    cfg = to_dict(Config(model=SMALL))
    path = tmp_path_factory.mktemp("run") / "last.pt"
    torch.save({"online": model.online.state_dict(), "target": model.target.state_dict(),
                "predictor": model.predictor.state_dict(), "config": cfg, "step": 7}, path)
    return path, model


def close(a, b):
    """Equal up to float32 rounding. Features of random-ish networks reach the thousands, and sums in
    another order (another batch size picks other kernels) differ by ~1e-6 of the largest of them,
    which small entries feel in full: the absolute floor scales with the largest feature."""
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 + 1e-6 * b.abs().max().item())


def torchvision_features(state, images):
    """Features of a real torchvision resnet18 holding ``state``, its fc made the identity."""
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    net.fc = torch.nn.Identity()
    return net.eval()(images)


def test_export_loads_into_torchvision_with_only_fc_missing(pretrain_ckpt, tmp_path, capsys):
    path, model = pretrain_ckpt
    out = tmp_path / "encoder.pt"
    assert export.main(["--checkpoint", str(path), "--out", str(out)]) == 0
    assert "resnet18" in capsys.readouterr().out
    state = torch.load(out)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert checkpoint.kind_of(state) == checkpoint.ENCODER  # tagged where torchvision never looks
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        got = torchvision_features(state, images)
        online = model.online.encoder.eval()(images)
        target = model.target.encoder.eval()(images)
    assert close(got, online)  # the online encoder, as the paper evaluates
    assert not torch.allclose(got, target, atol=1e-3)


def test_export_target_and_torchscript(pretrain_ckpt, tmp_path):
    path, model = pretrain_ckpt
    out = tmp_path / "target.pt"
    written = export.export_encoder(read_encoder_weights(path, "target"), path, out, formats=["torchscript"])
    assert written == [out, tmp_path / "target.torchscript.pt"]
    images01 = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        want = torchvision_features(torch.load(out), (images01 - MEAN) / STD)
        assert close(want, model.target.encoder.eval()((images01 - MEAN) / STD))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(written[1]))
    # The TorchScript module normalises by itself and takes uint8 too.
    assert close(scripted(images01), want)
    as_uint8 = (images01 * 255).round().to(torch.uint8)
    with torch.no_grad():
        want_u8 = torchvision_features(torch.load(out), (as_uint8.float() / 255 - MEAN) / STD)
    assert close(scripted(as_uint8), want_u8)


def test_feature_api_reads_checkpoint_and_export_alike(pretrain_ckpt, tmp_path):
    path, model = pretrain_ckpt
    out = tmp_path / "encoder.pt"
    export.export_encoder(read_encoder_weights(path), path, out)
    images01 = torch.rand(5, 3, 48, 48)
    from_ckpt = load_feature_extractor(path)
    from_export = load_feature_extractor(out)
    with torch.no_grad():
        want = model.online.encoder.eval()((images01 - MEAN) / STD)
    assert close(from_ckpt(images01), want)
    assert close(from_export(images01), want)
    assert close(from_ckpt.extract(images01, batch_size=2), want)
    from_ckpt.train()  # stays frozen: batch norm keeps its running statistics
    assert not from_ckpt.encoder.training and not any(p.requires_grad for p in from_ckpt.parameters())
    encoder, width = load_encoder(path)
    assert width == 512 and not encoder.training


def test_the_demo_backbone_exports_and_reads_back(tmp_path, capsys):
    """tiny_resnet has no torchvision constructor: the export says so, and the file reads back through
    the feature API (backbone inferred from the keys) with the features of the checkpoint's online encoder."""
    torch.manual_seed(0)
    tiny = dataclasses.replace(SMALL, backbone="tiny_resnet")
    model = BYOL(tiny)
    perturb(model.online, 3)
    path = tmp_path / "last.pt"
    torch.save({"online": model.online.state_dict(), "target": model.target.state_dict(),
                "config": to_dict(Config(model=tiny)), "step": 1}, path)
    out = tmp_path / "encoder.pt"
    assert export.main(["--checkpoint", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiny_resnet" in printed and "torchvision.models" not in printed
    assert read_encoder_weights(out).backbone == "tiny_resnet"
    images01 = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        want = model.online.encoder.eval()((images01 - MEAN) / STD)
    assert close(load_feature_extractor(out)(images01), want)


def test_backbone_is_inferred_from_a_torchvision_state_dict(tmp_path):
    with torch.device("meta"):
        sd = torchvision.models.resnet50().state_dict()
    assert infer_backbone({k: v for k, v in sd.items() if not k.startswith("fc.")}) == "resnet50"
    full = torchvision.models.resnet34().state_dict()  # with its classifier: fc.* is ignored
    torch.save(full, tmp_path / "r34.pt")
    weights = read_encoder_weights(tmp_path / "r34.pt")
    assert weights.backbone == "resnet34" and "fc.weight" not in weights.state


@pytest.mark.parametrize("prefix", ["module.", "backbone."])
def test_prefixed_keys_fail_loudly(tmp_path, prefix):
    sd = torchvision.models.resnet18().state_dict()
    torch.save({prefix + k: v for k, v in sd.items()}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=prefix.replace(".", r"\.")):
        load_feature_extractor(tmp_path / "bad.pt")


def test_missing_key_fails_loudly(tmp_path):
    sd = torchvision.models.resnet18().state_dict()
    del sd["layer4.1.bn2.running_var"]
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="keys match no known encoder"):
        load_encoder(tmp_path / "partial.pt")
    # Naming the backbone does not make a partial file load either.
    with pytest.raises(CheckpointError):
        load_encoder(tmp_path / "partial.pt", backbone="resnet18")


def test_export_cli_reports_bad_files(tmp_path, capsys):
    torch.save({"hello": 1}, tmp_path / "other.pt")
    assert export.main(["--checkpoint", str(tmp_path / "other.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "not a byol_fast checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.slow
def test_onnx_torch_export_and_safetensors_run_without_byol_fast(pretrain_ckpt, tmp_path, capsys):
    """Each artifact against the features torchvision's own ResNet-18 computes from the exported weights
    (an independent path): ONNX through ONNX Runtime, the torch.export program, safetensors into
    torchvision. Programs take RGB in [0, 1] and normalise it themselves, at any batch size."""
    import onnxruntime
    from safetensors.torch import load_file

    path, model = pretrain_ckpt
    out = tmp_path / "encoder.pt"
    assert export.main(["--checkpoint", str(path), "--out", str(out), "--onnx", "--torch-export",
                        "--safetensors"]) == 0
    printed = capsys.readouterr().out
    assert all(str(tmp_path / f"encoder{ext}") in printed for ext in (".onnx", ".pt2", ".safetensors"))
    images01 = torch.rand(5, 3, 64, 64)
    with torch.no_grad():
        want = torchvision_features(torch.load(out, weights_only=True), (images01 - MEAN) / STD)
        assert close(want, model.online.encoder.eval()((images01 - MEAN) / STD))
    session = onnxruntime.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):  # the batch dimension is dynamic
        got = session.run(None, {"images": images01[:n].numpy()})[0]
        assert close(torch.from_numpy(got), want[:n])
    program = torch.export.load(str(tmp_path / "encoder.pt2")).module()
    assert close(program(images01), want)
    other = torch.rand(2, 3, 96, 80)  # and so are height and width
    with torch.no_grad():
        want_other = torchvision_features(torch.load(out, weights_only=True), (other - MEAN) / STD)
    assert close(torch.from_numpy(session.run(None, {"images": other.numpy()})[0]), want_other)
    assert close(program(other), want_other)
    sd = load_file(str(tmp_path / "encoder.safetensors"))
    with torch.no_grad():
        assert close(torchvision_features(sd, (images01 - MEAN) / STD), want)
    assert read_encoder_weights(tmp_path / "encoder.safetensors").backbone == "resnet18"
    assert close(load_feature_extractor(tmp_path / "encoder.safetensors")(images01), want)
