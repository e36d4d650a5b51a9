"""BYOL networks: EMA against the naive formula, shapes, per-view forward passes."""
import copy

import pytest
import torch
import torchvision

from byol_fast.config import ModelConfig
from byol_fast.models.loss import byol_loss
from byol_fast.models.byol import BYOL
from byol_fast.models.resnet import build_encoder

SMALL = ModelConfig(backbone="resnet18", projector_hidden=64, projector_out=16, predictor_hidden=32)


def test_encoder_is_torchvision_resnet_without_fc():
    enc, width = build_encoder("resnet50")
    assert width == 2048
    ref = torchvision.models.resnet50()
    missing, unexpected = ref.load_state_dict(enc.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


def test_tiny_resnet_is_torchvision_resnet18_cut_to_one_block_per_stage():
    """The demo backbone: torchvision's names (resnet18's first block of each stage), widths 16-128,
    a 3x3 stride-1 stem, and every stride-2 stage halving a 32 px input down to 4x4 before pooling."""
    enc, width = build_encoder("tiny_resnet")
    ref = torchvision.models.resnet18().state_dict()
    expected = {k for k in ref if not k.startswith("fc.") and not any(f"layer{i}.1." in k for i in range(1, 5))}
    assert set(enc.state_dict()) == expected
    state = enc.state_dict()
    assert width == 128 and state["conv1.weight"].shape == (16, 3, 3, 3)
    assert [state[f"layer{i}.0.conv2.weight"].shape[0] for i in range(1, 5)] == [16, 32, 64, 128]
    sizes = []
    enc.layer4.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-2:]))
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, 128) and sizes == [(4, 4)]


# The BYOL paper's Table 1: encoder parameters without the classifier, in millions, as published
# (rounded to the million).
PAPER_PARAMETERS = {"resnet50": 24, "resnet50x2": 94, "resnet50x4": 375, "resnet200x2": 250}


@pytest.mark.parametrize("name,millions", sorted(PAPER_PARAMETERS.items()))
def test_the_papers_encoders_have_its_parameter_counts(name, millions):
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        enc, width = build_encoder(name)
    assert round(sum(p.numel() for p in enc.parameters()) / 1e6) == millions
    assert width == 2048 * (int(name.partition("x")[2] or 1))


def test_width_multiplies_every_channel_not_only_the_bottleneck():
    """ResNet-50 (2x) is not torchvision's wide_resnet50_2 (only the 3x3 convolutions widened): the
    stem, every block's input and output and the features are twice ResNet-50's too."""
    with torch.device("meta"):
        one, two = build_encoder("resnet50")[0].state_dict(), build_encoder("resnet50x2")[0].state_dict()
        wide = torchvision.models.wide_resnet50_2().state_dict()
    assert one.keys() == two.keys()
    for key, value in one.items():
        doubled = tuple(d * 2 for d in value.shape[:2]) if value.ndim == 4 else tuple(d * 2 for d in value.shape)
        assert two[key].shape[:len(doubled)] == doubled or key == "conv1.weight", key  # conv1: RGB in
    assert two["conv1.weight"].shape == (128, 3, 7, 7)
    assert wide["layer1.0.conv3.weight"].shape[0] == 256 != two["layer1.0.conv3.weight"].shape[0]


def test_a_width_one_scaled_resnet_computes_torchvisions_resnet50():
    from byol_fast.models.resnet import DEPTHS, ScaledResNet

    torch.manual_seed(0)
    ref = torchvision.models.resnet50().eval()
    ref.fc = torch.nn.Identity()
    net = ScaledResNet(DEPTHS[50], 1).eval()
    net.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))


def test_resnet200_has_the_published_blocks_and_a_same_padded_variant():
    with torch.device("meta"):
        enc, width = build_encoder("resnet200x2", "same")
    blocks = [len(getattr(enc, f"layer{i}")) for i in range(1, 5)]
    assert blocks == [3, 24, 36, 3] and width == 4096
    assert type(enc.conv1).__name__ == "SameConv2d" and type(enc.maxpool).__name__ == "SameMaxPool2d"


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="resnet9"):
        build_encoder("resnet9")


def test_head_shapes_match_paper_layout():
    model = BYOL(ModelConfig(backbone="resnet18"))
    proj = model.online.projector
    assert (proj[0].in_features, proj[0].out_features, proj[3].out_features) == (512, 4096, 256)
    assert proj[3].bias is None  # DeepMind: no bias on the last layer
    pred = model.predictor
    assert (pred[0].in_features, pred[0].out_features, pred[3].out_features) == (256, 4096, 256)
    assert all(not p.requires_grad for p in model.target.parameters())


def test_ema_matches_naive_formula_and_leaves_target_buffers():
    torch.manual_seed(0)
    model = BYOL(SMALL)
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(torch.randn_like(p))
        for b in model.target.buffers():
            if b.dtype.is_floating_point:
                b.fill_(7.0)
    online = copy.deepcopy(model.online.state_dict())
    target = copy.deepcopy(model.target.state_dict())
    tau = 0.9
    model.update_target(tau)
    params = {n for n, _ in model.target.named_parameters()}
    for name, value in model.target.state_dict().items():
        if name in params:
            expected = tau * target[name] + (1 - tau) * online[name]
            assert torch.allclose(value, expected, atol=1e-6), name
        else:  # running statistics are the target's own
            assert torch.equal(value, target[name]), name


def test_each_view_gets_its_own_forward_pass():
    torch.manual_seed(0)
    model = BYOL(SMALL).train()
    v1 = torch.randn(4, 3, 32, 32)
    v2 = torch.randn(4, 3, 32, 32) * 5 + 3  # different statistics: concatenation would change BN outputs
    ref = copy.deepcopy(model)
    loss = model(v1, v2)["loss"]
    with torch.no_grad():
        q1, q2 = ref.predictor(ref.online(v1)), ref.predictor(ref.online(v2))
        z1, z2 = ref.target(v1), ref.target(v2)
        separate = byol_loss(q1, q2, z1, z2)
        both = ref.predictor(ref.online(torch.cat([v1, v2])))
        zb = ref.target(torch.cat([v1, v2]))
        mixed = byol_loss(both[:4], both[4:], zb[:4], zb[4:])
    assert torch.allclose(loss, separate, atol=1e-5)
    assert not torch.allclose(loss, mixed, atol=1e-3)


def test_gradients_reach_online_and_predictor_only():
    model = BYOL(SMALL).train()
    model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))["loss"].backward()
    assert all(p.grad is not None for p in model.online.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert all(p.grad is None for p in model.target.parameters())
