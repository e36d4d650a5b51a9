"""DeepMind's JAX/Haiku BYOL release (byol_fast.importers.deepmind) and TensorFlow SAME padding
(byol_fast.models.resnet.build_encoder(padding="same")), against references written here by hand: explicit
asymmetric F.pad + F.conv2d(padding=0) + F.max_pool2d, on Haiku's own arrays (HWIO kernels,
(1, 1, 1, C) batch-norm parameters, EMA averages), Haiku's BlockV1 (stride on the 3x3 conv_1)."""
import codecs
import math
import pickle
import pickletools
import sys
import types
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from byol_fast import convert as convert_cli
from byol_fast.weights import importers, safe_load
from byol_fast.errors import CheckpointError
from byol_fast.weights.checkpoint import load
from byol_fast.weights.importers import deepmind
from byol_fast.weights.encoder_file import load_feature_extractor
from byol_fast.models.resnet import build_encoder

dill = pytest.importorskip("dill")  # in requirements.txt; absent only on the lent GPU machine (no package index)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # byol/utils/dataset.py normalize_images, on [0, 1]
EPS = 1e-5  # byol/configs/byol.py bn_config


# ---------------------------------------------------------------------------- the references


def tf_same(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's SAME padding (before, after) of one axis: the smaller half before."""
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def pad_same(x, k: int, s: int, value: float = 0.0):
    top, bottom = tf_same(x.shape[-2], k, s)
    left, right = tf_same(x.shape[-1], k, s)
    return F.pad(x, (left, right, top, bottom), value=value)


def resnet_v1(x, conv, bn, stem: tuple[str, str], blocks: list) -> torch.Tensor:
    """A ResNet v1 in eval mode, computed from its parts: ``conv(h, name, stride)`` and ``bn(h, name)``
    read one layer's weights; ``stem`` names the 7x7 convolution and its batch norm; each block is
    (its convolutions as (conv, bn, stride), its shortcut projection as (conv, bn, stride) or None).
    The max pool is padded the TensorFlow way; features are the global average."""
    h = F.relu(bn(conv(x, stem[0], 2), stem[1]))
    h = F.max_pool2d(pad_same(h, 3, 2, float("-inf")), 3, 2)
    for convs, shortcut in blocks:
        skip = h if shortcut is None else bn(conv(h, shortcut[0], shortcut[2]), shortcut[1])
        for i, (c, b, stride) in enumerate(convs):
            h = bn(conv(h, c, stride), b)
            if i < len(convs) - 1:
                h = F.relu(h)
        h = F.relu(h + skip)
    return h.mean(dim=(2, 3))


def residual_blocks(name, has, conv_bn, projection, strided) -> list:
    """The blocks of a four-stage ResNet v1 for :func:`resnet_v1`, read from its names: ``name(stage, b)``
    is block b's prefix, ``has(block, i)`` whether its i-th convolution (from 0) exists, ``conv_bn(block, i)``
    the names of that convolution and its batch norm, ``projection(block)`` the shortcut's (or None),
    ``strided(n)`` which convolution of an n-convolution block carries the stage's stride."""
    blocks = []
    for stage in range(4):
        b = 0
        while has(name(stage, b), 0):
            block = name(stage, b)
            stride = 2 if stage > 0 and b == 0 else 1
            n = 3 if has(block, 2) else 2
            shortcut = projection(block)
            blocks.append(([(*conv_bn(block, i), stride if i == strided(n) else 1) for i in range(n)],
                           shortcut and (*shortcut, stride)))
            b += 1
    return blocks


def haiku_forward(params: dict, state: dict, net: str, x: torch.Tensor) -> torch.Tensor:
    """DeepMind's ResNetTorso + Haiku's BlockV1 in eval mode, on the Haiku arrays themselves:
    SAME-padded convolutions and max pool, batch norm from the EMA averages."""
    dtype = x.dtype

    def conv(h, module, stride):
        w = torch.from_numpy(params[module]["w"]).permute(3, 2, 0, 1).to(dtype)  # HWIO -> OIHW
        return F.conv2d(pad_same(h, w.shape[-1], stride), w, stride=stride)

    def bn(h, module):
        c = lambda a: torch.from_numpy(np.asarray(a)).to(dtype).reshape(1, -1, 1, 1)  # noqa: E731
        mean, var = c(state[f"{module}/~/mean_ema"]["average"]), c(state[f"{module}/~/var_ema"]["average"])
        scale, offset = c(params[module]["scale"]), c(params[module]["offset"])
        return (h - mean) * (scale * torch.rsqrt(var + EPS)) + offset

    stem = next(m for m in params if m.startswith(f"{net}/~/initial_conv"))
    blocks = residual_blocks(
        lambda g, b: f"{net}/~/block_group_{g}/~/block_{b}/~/", lambda block, i: f"{block}conv_{i}" in params,
        lambda block, i: (f"{block}conv_{i}", f"{block}batchnorm_{i}"),
        lambda block: (block + "shortcut_conv", block + "shortcut_batchnorm") if block + "shortcut_conv" in params else None,
        strided=lambda n: 1)
    return resnet_v1(x, conv, bn, (stem, f"{net}/~/initial_batchnorm"), blocks)


def tf_forward(state: dict, x: torch.Tensor) -> torch.Tensor:
    """A torchvision ResNet (BasicBlock: stride on conv1; Bottleneck: on conv2) in eval mode, by hand,
    with every convolution and the max pool padded the TensorFlow way."""
    def conv(h, key, stride):
        w = state[key + ".weight"].to(x.dtype)
        return F.conv2d(pad_same(h, w.shape[-1], stride), w, stride=stride)

    def bn(h, key):
        c = lambda name: state[f"{key}.{name}"].to(x.dtype).view(1, -1, 1, 1)  # noqa: E731
        return (h - c("running_mean")) * (c("weight") * torch.rsqrt(c("running_var") + EPS)) + c("bias")

    blocks = residual_blocks(
        lambda g, b: f"layer{g + 1}.{b}.", lambda block, i: f"{block}conv{i + 1}.weight" in state,
        lambda block, i: (f"{block}conv{i + 1}", f"{block}bn{i + 1}"),
        lambda block: (block + "downsample.0", block + "downsample.1") if block + "downsample.0.weight" in state else None,
        strided=lambda n: 1 if n == 3 else 0)
    return resnet_v1(x, conv, bn, ("conv1", "bn1"), blocks)


def random_state(name: str, seed: int = 0) -> dict:
    """A torchvision encoder's state with random weights and batch-norm statistics (no fc)."""
    torch.manual_seed(seed)
    net = build_encoder(name)[0]
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
                m.running_mean.copy_(0.1 * torch.randn_like(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
    return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}


def to_haiku(state: dict, net: str, stem: str = "initial_conv") -> tuple[dict, dict]:
    """(params, state) in Haiku's names and shapes for a torchvision state, as DeepMind's code holds them."""
    def module(tv: str) -> str:
        if tv in ("conv1", "bn1"):
            return f"{net}/~/" + (stem if tv == "conv1" else "initial_batchnorm")
        layer, block, rest = tv.split(".", 2)
        prefix = f"{net}/~/block_group_{int(layer[5:]) - 1}/~/block_{block}/~/"
        if rest.startswith("downsample"):
            return prefix + ("shortcut_conv" if rest.endswith("0") else "shortcut_batchnorm")
        kind = "conv" if rest.startswith("conv") else "batchnorm"
        return prefix + f"{kind}_{int(rest[-1]) - 1}"

    params, bn_state = {}, {}
    for key, value in state.items():
        tv, name = key.rsplit(".", 1)
        m, a = module(tv), value.numpy()
        if name == "weight" and a.ndim == 4:
            params.setdefault(m, {})["w"] = np.ascontiguousarray(a.transpose(2, 3, 1, 0))  # OIHW -> HWIO
        elif name in ("weight", "bias"):
            params.setdefault(m, {})["scale" if name == "weight" else "offset"] = a.reshape(1, 1, 1, -1).copy()
        elif name in ("running_mean", "running_var"):
            avg = a.reshape(1, 1, 1, -1).copy()
            bn_state[f"{m}/~/{'mean_ema' if name == 'running_mean' else 'var_ema'}"] = {
                "average": avg, "counter": np.array(500500, np.int32), "hidden": avg.copy()}
    return params, bn_state


def release(params: dict, bn_state: dict, width: int) -> dict:
    """The structure of DeepMind's checkpoint (byol/utils/checkpointing.py), with the NamedTuples
    (experiment state, LARS state) and Haiku's FlatMapping as the plain containers they reduce to."""
    rng = np.random.default_rng(0)
    heads, head_state = {}, {}
    for head, (cin, hidden, cout) in {"projector": (width, 32, 16), "predictor": (16, 32, 16)}.items():
        heads[f"{head}/~/linear"] = {"w": rng.standard_normal((cin, hidden), np.float32),
                                     "b": np.zeros(hidden, np.float32)}
        heads[f"{head}/~/batch_norm"] = {"scale": np.ones((1, hidden), np.float32),
                                         "offset": np.zeros((1, hidden), np.float32)}
        heads[f"{head}/~/linear_1"] = {"w": rng.standard_normal((hidden, cout), np.float32)}
        for ema in ("mean_ema", "var_ema"):
            head_state[f"{head}/~/batch_norm/~/{ema}"] = {"average": np.ones((1, hidden), np.float32),
                                                          "counter": np.array(7, np.int32),
                                                          "hidden": np.ones((1, hidden), np.float32)}
    heads["classifier"] = {"w": np.zeros((width, 10), np.float32), "b": np.zeros(10, np.float32)}
    online_params, online_state = {**params, **heads}, {**bn_state, **head_state}
    experiment_state = {"online_params": online_params, "target_params": online_params,  # pickled once (memo)
                        "online_state": online_state, "target_state": online_state,
                        "opt_state": [(), {"mu": online_params}, ()]}  # add_weight_decay, LARS, scale
    return {"experiment_state": experiment_state, "step": 500500, "rng": np.array([0, 42], np.uint32)}


# ---------------------------------------------------------------------------- (a) SAME padding


@pytest.mark.parametrize("size", [64, 57])
def test_same_encoder_matches_tensorflow_padding_by_hand_and_differs_from_torchvision(size):
    state = random_state("resnet18")
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
    ref = tf_forward(state, x)

    same, _ = build_encoder("resnet18", "same")
    same.load_state_dict(state)
    symmetric, _ = build_encoder("resnet18")
    symmetric.load_state_dict(state)
    with torch.no_grad():
        got = same.double().eval()(x)
        tv = symmetric.double().eval()(x)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())
    assert (tv - ref).abs().max() > 1e-2 * ref.abs().max()  # torchvision's symmetric padding is another network


def test_strided_layers_pad_smaller_half_before():
    """7x7 stride-2 stem on 224: 2 before, 3 after; 3x3 stride-2 on an even size: 0 and 1; the max
    pool pads with -inf (an all-negative input: zero padding would win the max)."""
    enc, _ = build_encoder("resnet18", "same")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 224, 224, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(enc.conv1(x), F.conv2d(F.pad(x, (2, 3, 2, 3)), enc.conv1.weight, stride=2))
        h = torch.randn(1, 64, 56, 56, generator=g)
        conv = enc.layer2[0].conv1  # BasicBlock: the strided 3x3
        torch.testing.assert_close(conv(h), F.conv2d(F.pad(h, (0, 1, 0, 1)), conv.weight, stride=2))
        neg = -1 - torch.rand(1, 64, 112, 112, generator=g)
        want = F.max_pool2d(F.pad(neg, (0, 1, 0, 1), value=float("-inf")), 3, 2)
        assert torch.equal(enc.maxpool(neg), want) and want.max() < 0
    assert set(enc.state_dict()) == set(build_encoder("resnet18")[0].state_dict())
    with pytest.raises(ValueError, match="tiny_resnet"):
        build_encoder("tiny_resnet", "same")


def test_a_same_padded_encoder_exports_and_its_program_pads_as_tensorflow_at_any_size(tmp_path, capsys):
    """``export --torch-export`` of a SAME-padding encoder: the program, traced at one size, gives the
    TensorFlow-padded network's features (computed by hand) at even and odd heights and widths."""
    from byol_fast import export
    from byol_fast.weights.checkpoint import save_encoder

    state = random_state("resnet18", seed=4)
    src, out = tmp_path / "same.pt", tmp_path / "encoder.pt"
    encoder = build_encoder("resnet18")[0]
    encoder.load_state_dict(state)
    save_encoder(encoder.state_dict(), src, MEAN, STD, padding="same")  # as convert writes a DeepMind encoder
    assert export.main(["--checkpoint", str(src), "--out", str(out), "--torch-export"]) == 0
    assert "SAME-padding" in capsys.readouterr().out
    program = torch.export.load(str(tmp_path / "encoder.pt2")).module()
    g = torch.Generator().manual_seed(6)
    for h, w in ((64, 64), (57, 70), (33, 41)):
        x = torch.rand(2, 3, h, w, generator=g)
        normed = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        ref = tf_forward(state, normed.double()).float()
        torch.testing.assert_close(program(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


# ---------------------------------------------------------------------------- (b) a file in DeepMind's layout


@pytest.fixture(scope="module")
def resnet50_release(tmp_path_factory):
    state = random_state("resnet50", seed=1)
    params, bn_state = to_haiku(state, "res_net50", stem="initial_conv_1")  # as converters of the release expect
    path = tmp_path_factory.mktemp("deepmind") / "pretrain_res50x1.pkl"
    with open(path, "wb") as f:
        dill.dump(release(params, bn_state, 2048), f, protocol=2)  # as byol/utils/checkpointing.py writes it
    return path, load(path), params, bn_state  # load: byol_fast's reader (numpy arrays in plain containers only)


class _ModuleName(str):
    pass


class _Dill03(pickle.Pickler):
    """Writes numpy's built-in _reconstruct and _codecs.encode as dill 0.3 (the release's time) does:
    ``_get_attr(_import_module(module), name)``; seen by running dill 0.3.2 on a dict of an array
    (its disassembly: _get_attr, _import_module('numpy._core._multiarray_umath'), '_reconstruct', and
    the same for '_codecs' 'encode'), which the pinned dill no longer does."""

    def reducer_override(self, obj):
        if obj is np.ndarray.__reduce__(np.zeros(1))[0]:
            return dill._dill._get_attr, (_ModuleName("numpy.core._multiarray_umath"), "_reconstruct")
        if obj is codecs.encode:
            return dill._dill._get_attr, (_ModuleName("_codecs"), "encode")
        if type(obj) is _ModuleName:
            return dill._dill._import_module, (str(obj),)
        return NotImplemented


def test_the_release_is_read_as_dill_0_3_wrote_it(resnet50_release, tmp_path):
    src, obj = resnet50_release[:2]
    old = tmp_path / "dill03.pkl"
    with open(old, "wb") as f:
        _Dill03(f, protocol=2).dump(obj)
    names = {arg for op, arg, _ in pickletools.genops(old.read_bytes()) if op.name == "GLOBAL"}
    assert {"dill._dill _get_attr", "dill._dill _import_module"} <= names and not any("_reconstruct" in n for n in names)
    assert importers.convert(load(old), old).state.keys() == importers.convert(obj, src).state.keys()
    for module, name in (("os", "system"), ("numpy", "load"), ("builtins", "eval")):
        class Reach:  # the same two calls, reaching for something else
            def __reduce__(self):
                return dill._dill._get_attr, (_ModuleName(module), name)
        bad = tmp_path / f"{name}.pkl"
        with open(bad, "wb") as f:
            _Dill03(f, protocol=2).dump({"w": Reach()})
        with pytest.raises(CheckpointError, match=f"{module}.{name}"):
            load(bad)


def test_the_release_is_read_as_dill_writes_it(resnet50_release, tmp_path):
    """dill pickles every numpy array through its own dill._dill._create_array: admitted, and only
    around numpy's reconstruction of a plain array; a plain pickle of the same arrays reads the same."""
    src, obj = resnet50_release[:2]
    names = {arg for op, arg, _ in pickletools.genops(src.read_bytes()) if op.name == "GLOBAL"}
    assert "dill._dill _create_array" in names  # the test exercises what the real file holds
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(obj, protocol=2))
    again = load(plain)
    conv = obj["experiment_state"]["online_params"]["res_net50/~/initial_conv_1"]["w"]
    assert type(conv) is np.ndarray and np.array_equal(conv, again["experiment_state"]["online_params"][
        "res_net50/~/initial_conv_1"]["w"])

    class Sneaky:  # dill's array call, but around another (admitted) callable
        def __reduce__(self):
            return dill._dill._create_array, (codecs.encode, ("echo", "latin1"), None, None)

    bad = tmp_path / "sneaky.pkl"
    bad.write_bytes(pickle.dumps({"w": Sneaky()}, protocol=2))
    with pytest.raises(CheckpointError, match="encode") as e:
        load(bad)
    assert "\n" not in str(e.value)


def test_release_converts_and_gives_the_tensorflow_padded_features(resnet50_release, tmp_path, capsys):
    src, obj, params, bn_state = resnet50_release
    assert importers.detect(obj) == "deepmind"
    out = tmp_path / "encoder.pt"
    assert convert_cli.main([str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "deepmind: mapped 318 backbone tensors" in printed and "padding same" in printed

    converted = importers.convert(obj, str(src))
    why = set(converted.dropped.values())
    assert {"projector", "predictor", "online linear classifier", "target network", "optimizer state",
            "training step", "RNG key"} <= why
    assert not any(k.startswith("online_params/res_net50") for k in converted.dropped)

    g = torch.Generator().manual_seed(3)
    images = [torch.rand(2, 3, n, n, generator=g) for n in (64, 57)]  # RGB in [0, 1]
    normed = [(x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1) for x in images]
    refs = [haiku_forward(params, bn_state, "res_net50", x.double()).float() for x in normed]
    for path in (src, out):  # the release itself, and the converted encoder (tagged padding "same")
        model = load_feature_extractor(path)
        for x, ref in zip(images, refs):
            feats = model(x)
            assert feats.shape == (2, 2048)
            torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    symmetric = torchvision.models.resnet50()
    symmetric.fc = torch.nn.Identity()
    symmetric.load_state_dict(torch.load(out, weights_only=True))
    with torch.no_grad():
        assert (symmetric.eval()(normed[0]) - refs[0]).abs().max() > 1e-2 * refs[0].abs().max()


@pytest.mark.slow
def test_the_resnet200x2_release_converts_and_gives_the_haiku_networks_features(tmp_path):
    """pretrain_res200x2.pkl's structure: ResNet200 (Haiku's res_net200: bottleneck blocks 3, 24, 36,
    3) with width multiplier 2 (a 128-channel stem, 4096 features), 250M parameters; converted and
    read as a feature extractor, it computes what the Haiku network computes by hand."""
    state = random_state("resnet200x2", seed=2)
    params, bn_state = to_haiku(state, "res_net200")
    assert params["res_net200/~/initial_conv"]["w"].shape == (7, 7, 3, 128)
    assert "res_net200/~/block_group_2/~/block_35/~/conv_2" in params
    src = tmp_path / "pretrain_res200x2.pkl"
    with open(src, "wb") as f:
        dill.dump(release(params, bn_state, 4096), f, protocol=2)
    del state
    converted = importers.convert(safe_load.read(src), str(src))  # in this process; the file read again below as users do
    assert converted.layout == "deepmind" and converted.padding == "same" and not converted.unmapped
    x = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(5))
    normed = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    ref = haiku_forward(params, bn_state, "res_net200", normed)
    model = load_feature_extractor(src)
    assert model.width == 4096
    feats = model(x)
    assert feats.shape == (1, 4096)
    torch.testing.assert_close(feats, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


def test_experiment_state_as_its_namedtuple_fields_in_order(resnet50_release):
    obj = resnet50_release[1]
    es = obj["experiment_state"]
    as_tuple = {**obj, "experiment_state": tuple(es[k] for k in deepmind.FIELDS)}
    assert importers.detect(as_tuple) == "deepmind"
    a, b = importers.convert(as_tuple, "x.pkl").state, importers.convert(obj, "x.pkl").state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- (c) refusals


@pytest.mark.parametrize("field, module, tensor", [
    ("online_state", "res_net50/~/block_group_1/~/block_0/~/batchnorm_1/~/var_ema", "average"),
    ("online_params", "res_net50/~/block_group_2/~/block_3/~/conv_1", "w"),
])
def test_missing_tensor_is_refused_naming_it(resnet50_release, field, module, tensor):
    obj = resnet50_release[1]
    es = dict(obj["experiment_state"])
    es[field] = {**es[field], module: {k: v for k, v in es[field][module].items() if k != tensor}}
    with pytest.raises(CheckpointError, match=f"{field}/{module}/{tensor}"):
        importers.convert({**obj, "experiment_state": es}, "x.pkl")


@pytest.mark.parametrize("first_shortcut", [False, True])
def test_resnet18_is_refused(first_shortcut):
    """Haiku's non-bottleneck BlockV1 strides its second 3x3 conv, torchvision's BasicBlock the first:
    same shapes, another network (the hand-made Haiku forward and the converted one disagree). DeepMind's
    own ResNet18 also projects block_group_0's shortcut (use_projection all True), which torchvision lacks."""
    state = random_state("resnet18")
    params, bn_state = to_haiku(state, "res_net18")
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert (haiku_forward(params, bn_state, "res_net18", x) - tf_forward(state, x)).abs().max() > 1e-3
    if first_shortcut:
        extra = "res_net18/~/block_group_0/~/block_0/~/shortcut_"
        params[extra + "conv"] = {"w": np.zeros((1, 1, 64, 64), np.float32)}
        params[extra + "batchnorm"] = {"scale": np.ones((1, 1, 1, 64), np.float32),
                                       "offset": np.zeros((1, 1, 1, 64), np.float32)}
    obj = release(params, bn_state, 512)
    assert importers.detect(obj) == "deepmind"
    with pytest.raises(CheckpointError, match="res_net18 is built of Haiku's non-bottleneck BlockV1"):
        importers.convert(obj, "x.pkl")


def test_the_real_files_classes_are_read_as_inert_data(resnet50_release, tmp_path, monkeypatch):
    """The release pickles byol.byol_experiment._ByolExperimentState and Haiku's FlatMapping: the
    reader rebuilds them as a namedtuple and a dict of the same contents, importing neither, and the
    file converts; any other class of the same packages is still refused by name."""
    src, obj, params, bn_state = resnet50_release

    class _ByolExperimentState(NamedTuple):
        online_params: dict
        target_params: dict
        online_state: dict
        target_state: dict
        opt_state: list

    class FlatMapping(dict):
        def __reduce__(self):
            return FlatMapping, (dict(self),)

    class Evil(dict):
        pass

    experiment = types.ModuleType("byol.byol_experiment")
    structures = types.ModuleType("haiku._src.data_structures")
    for cls, mod in ((_ByolExperimentState, experiment), (FlatMapping, structures), (Evil, experiment)):
        cls.__module__, cls.__qualname__ = mod.__name__, cls.__name__
        setattr(mod, cls.__name__, cls)
    for name, mod in (("byol", types.ModuleType("byol")), ("byol.byol_experiment", experiment),
                      ("haiku", types.ModuleType("haiku")), ("haiku._src", types.ModuleType("haiku._src")),
                      ("haiku._src.data_structures", structures)):
        monkeypatch.setitem(sys.modules, name, mod)
        if "." in name:  # a package holds its modules, as the writer's installed byol and haiku did
            parent, child = name.rsplit(".", 1)
            setattr(sys.modules[parent], child, mod)
    fields = obj["experiment_state"]
    state = _ByolExperimentState(FlatMapping(fields["online_params"]), {}, FlatMapping(fields["online_state"]), {}, [])
    path = tmp_path / "pretrain.pkl"
    with open(path, "wb") as f:
        dill.dump({"experiment_state": state, "step": 1}, f, protocol=2)
    names = {arg for op, arg, _ in pickletools.genops(path.read_bytes()) if op.name == "GLOBAL"}
    assert {"dill._dill _create_namedtuple", "haiku._src.data_structures FlatMapping"} <= names
    monkeypatch.delitem(sys.modules, "byol.byol_experiment")  # the reader must not need them
    monkeypatch.delitem(sys.modules, "haiku._src.data_structures")
    got = load(path)
    assert type(got["experiment_state"]).__name__ == "_ByolExperimentState" and importers.detect(got) == "deepmind"
    assert type(got["experiment_state"].online_params) is dict
    assert importers.convert(got, path).state.keys() == importers.convert(obj, src).state.keys()
    monkeypatch.setitem(sys.modules, "byol.byol_experiment", experiment)
    with open(path, "wb") as f:
        pickle.dump({"experiment_state": Evil()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="byol.byol_experiment.Evil"):
        load(path)
