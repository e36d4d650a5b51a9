"""Importer of DeepMind's JAX/Haiku BYOL release (``pretrain_res50x1.pkl``, ``pretrain_res200x2.pkl``,
deepmind-research/byol).

The layout, from the project's code:

- ``byol/utils/checkpointing.py`` writes ``dill.dump(dict(experiment_state=..., step=step, rng=rng),
  protocol=2)`` with ``experiment_state = jax.tree_map(lambda x: jax.device_get(x[0]), state)``: every
  leaf is the first device's copy as a numpy array (``rng``, a JAX DeviceArray, pickles as one too);
- ``byol/byol_experiment.py``: ``experiment_state`` is the NamedTuple ``_ByolExperimentState``
  (``online_params``, ``target_params``, ``online_state``, ``target_state``, ``opt_state``, in that
  order; the linear evaluation reads ``.online_params`` and ``.online_state``). Params and state are
  Haiku's two-level mappings, module name -> parameter name -> array;
- ``byol/utils/networks.py``: ``ResNet50`` (Haiku names it ``res_net50``; ``ResNet200`` is ``res_net200``,
  and a width multiplier scales every channel count, 64 x width in the stem) holds ``initial_conv`` (7x7
  stride 2, SAME), ``initial_batchnorm``, then ``block_group_{0..3}/~/block_{i}`` of Haiku's
  ``BlockV1`` (``conv_0``/``batchnorm_0`` 1x1, ``conv_1``/``batchnorm_1`` 3x3 carrying the stride, as
  torchvision's v1.5 ``conv2``, ``conv_2``/``batchnorm_2`` 1x1; ``shortcut_conv``/``shortcut_batchnorm``
  on the first block of every group); a 3x3 stride-2 SAME max pool; no classifier layer (its
  ``logits`` is never called). ``projector`` and ``predictor`` (``linear``, ``batch_norm``,
  ``linear_1``) and the online linear probe ``classifier`` sit beside it. Converters others wrote
  for the released files expect the stem as ``initial_conv_1`` (the name Haiku gives a second
  module called ``initial_conv``, as an earlier revision of networks.py made): both are accepted.
  Without bottleneck (``ResNet18``/``34``) BlockV1 is two 3x3 convs with the stride on the second,
  where torchvision's BasicBlock strides the first: the same shapes, another network, so those are
  refused (as they would be anyway: DeepMind's project block_group_0's shortcut too);
- Haiku (``hk.Conv2D``, ``hk.BatchNorm``): conv ``w`` is HWIO; ``scale``/``offset`` have the shape
  (1, 1, 1, C); the batch-norm moving statistics are state ``<bn>/~/mean_ema`` and ``<bn>/~/var_ema``
  (``ExponentialMovingAverage``: ``average``, the zero-debiased value evaluation uses, ``hidden``,
  ``counter``). Haiku normalises with that (biased) variance and eps 1e-5, as torch's eval mode does
  with ``running_var``;
- ``byol/utils/dataset.py``: images are scaled to [0, 1] and normalised with ImageNet's mean/std.

The real file pickles ``_ByolExperimentState`` (``byol.byol_experiment``), Haiku's ``FlatMapping``
(or the earlier ``frozendict``) and the optimizer's state NamedTuples: ``byol_fast.weights.safe_load``
(its unpickler, ``byol_fast.weights.unpickler``) rebuilds those as inert data (a namedtuple with the
same fields, a dict) without importing them, so this module sees ``experiment_state`` as the
5-tuple of its fields (or, re-saved with numpy only, as a mapping of the five field names, or those
five at the top) and Haiku's mappings as dicts. dill writes some things its own way, which the
reader also takes as data: a namedtuple class as
``dill._dill._create_namedtuple(name, fields, module)``, numpy's array reconstruction as
``_get_attr(_import_module(...), '_reconstruct')`` (dill 0.3, the release's time) or
``_create_array`` (dill 0.3.6 and later); tested with files written by dill itself and in dill 0.3's
form. Not tried on the released file itself (it cannot be downloaded here).

The mapping: ``<net>/~/initial_conv`` -> ``conv1``, ``initial_batchnorm`` -> ``bn1``,
``block_group_{g}/~/block_{b}/~/conv_{i}`` / ``batchnorm_{i}`` -> ``layer{g+1}.{b}.conv{i+1}`` /
``bn{i+1}``, ``shortcut_conv`` / ``shortcut_batchnorm`` -> ``downsample.0`` / ``downsample.1``;
``w`` (HWIO) -> ``weight`` (OIHW), ``scale``/``offset`` -> ``weight``/``bias``, ``mean_ema``/``var_ema``
``average`` -> ``running_mean``/``running_var``, ``num_batches_tracked`` = 0. Padding "same": the
network pads as TensorFlow (byol_fast.models.resnet.build_encoder).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import torch

from byol_fast.config import BACKBONES
from byol_fast.errors import CheckpointError
from byol_fast.models.resnet import build_encoder
from byol_fast.weights.importers import Converted, top_level_dropped

# _ByolExperimentState's fields, in their order.
FIELDS = ("online_params", "target_params", "online_state", "target_state", "opt_state")
DROPPED_FIELDS = {"target_params": "target network", "target_state": "target network",
                  "opt_state": "optimizer state"}
TOP_LEVEL = {"step": "training step", "rng": "RNG key"}
HEADS = {"projector": "projector", "predictor": "predictor", "classifier": "online linear classifier"}

_STEM = re.compile(r"initial_(conv|batchnorm)(?:_1)?")
_BLOCK = re.compile(r"block_group_(\d+)/~/block_(\d+)/~/(conv|batchnorm)_(\d+)")
_SHORTCUT = re.compile(r"block_group_(\d+)/~/block_(\d+)/~/shortcut_(conv|batchnorm)")
_EMA = {"mean_ema": "running_mean", "var_ema": "running_var"}
_PARAM = {"conv": {"w": "weight"}, "batchnorm": {"scale": "weight", "offset": "bias"}}


def _experiment_state(obj) -> dict | None:
    """The five fields of ``obj``'s experiment state, or None: ``experiment_state`` as a mapping with
    exactly those names, as their 5-tuple (a NamedTuple reduced to a tuple), or those five names at
    the top (``experiment_state._asdict()`` saved alone)."""
    if not isinstance(obj, Mapping):
        return None
    es = obj.get("experiment_state", obj)
    if isinstance(es, Mapping):
        fields = dict(es) if set(es) == set(FIELDS) else None
    elif isinstance(es, (tuple, list)) and len(es) == len(FIELDS):
        fields = dict(zip(FIELDS, es))
    else:
        fields = None
    if fields and isinstance(fields["online_params"], Mapping) and isinstance(fields["online_state"], Mapping):
        return fields
    return None


def _network(params: Mapping) -> str | None:
    """The encoder's Haiku module name (``res_net50``): the one prefix whose ``initial_conv`` (or
    ``initial_conv_1``) holds a ``w``."""
    names = set()
    for module, tensors in params.items():
        net, sep, rest = str(module).partition("/~/")
        if sep and rest in ("initial_conv", "initial_conv_1") and isinstance(tensors, Mapping) and "w" in tensors:
            names.add(net)
    return names.pop() if len(names) == 1 else None


def detect(obj: dict) -> bool:
    fields = _experiment_state(obj)
    if fields is None:
        return False
    net = _network(fields["online_params"])
    return net is not None and any(str(m).startswith(f"{net}/~/") and str(m).endswith("/~/mean_ema")
                                   for m in fields["online_state"])


def _torch_module(module: str) -> tuple[str, str] | None:
    """(torchvision module path, "conv" or "batchnorm") of a Haiku module path below the network, or None."""
    stem = _STEM.fullmatch(module)
    if stem:
        return ("conv1" if stem[1] == "conv" else "bn1"), stem[1]
    block = _BLOCK.fullmatch(module)
    if block:
        group, index, kind, i = block[1], block[2], block[3], int(block[4])
        return f"layer{int(group) + 1}.{int(index)}.{'conv' if kind == 'conv' else 'bn'}{i + 1}", kind
    short = _SHORTCUT.fullmatch(module)
    if short:
        return f"layer{int(short[1]) + 1}.{int(short[2])}.downsample.{0 if short[3] == 'conv' else 1}", short[3]
    return None


def _tensor(value) -> torch.Tensor:
    return torch.tensor(np.asarray(value))


def _leaves(tree, path: str, _seen: set | None = None):
    """(path, leaf) of every array in nested mappings, lists and tuples; path parts joined by "/".
    A container met again (a file may refer to one list from many places, nesting to 10**30
    paths in a few KB) is one leaf at each further place, not walked again."""
    seen = set() if _seen is None else _seen
    if isinstance(tree, (Mapping, list, tuple)) and id(tree) in seen:
        yield path, tree
    elif isinstance(tree, Mapping):
        seen.add(id(tree))
        for k, v in tree.items():
            yield from _leaves(v, f"{path}/{k}", seen)
    elif isinstance(tree, (list, tuple)):
        seen.add(id(tree))
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{path}/{i}", seen)
    else:
        yield path, tree


def _encoder_modules(tree: Mapping, net: str, prefix: str, dropped: dict):
    """(module, its name under the encoder, values) of the encoder's modules in a Haiku ``tree``;
    the other networks' modules (heads) go to ``dropped`` with their reason."""
    for module, values in tree.items():
        module = str(module)
        head = module.split("/~/", 1)[0]
        if head != net:
            reason = HEADS.get(head, "not part of the encoder")
            dropped.update({path: reason for path, _ in _leaves(values, f"{prefix}/{module}")})
            continue
        yield module, module[len(net) + 3:], values


def convert(obj: dict) -> Converted:
    fields = _experiment_state(obj)
    params, state = fields["online_params"], fields["online_state"]
    net = _network(params)
    convs = [_BLOCK.fullmatch(str(m)[len(net) + 3:]) for m in params if str(m).startswith(f"{net}/~/")]
    if any(convs) and not any(m and m[3] == "conv" and m[4] == "2" for m in convs):
        raise CheckpointError(
            f"deepmind layout: {net} is built of Haiku's non-bottleneck BlockV1, which puts the stride on "
            "its second 3x3 convolution (conv_1) where torchvision's BasicBlock puts it on the first: the "
            "shapes match but no torchvision ResNet computes the same network")
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}  # torchvision key -> source key, for the messages
    dropped: dict[str, str] = {}
    unmapped: list[str] = []

    if "experiment_state" in obj:
        dropped.update(top_level_dropped(obj, "experiment_state", TOP_LEVEL))
    for name, reason in DROPPED_FIELDS.items():
        dropped.update({path: reason for path, _ in _leaves(fields[name], name)})

    def put(key: str, value: torch.Tensor, src: str) -> None:
        if key in out:  # e.g. both initial_conv and initial_conv_1: which one is the network's is unknown
            unmapped.extend([source[key], src])
        out[key], source[key] = value, src

    bn_modules = set()
    for module, rest, tensors in _encoder_modules(params, net, "online_params", dropped):
        target = _torch_module(rest)
        if target is None or not isinstance(tensors, Mapping):
            if rest == "logits":  # ResNetTorso's classifier layer (never called in DeepMind's code)
                dropped.update({path: "classifier" for path, _ in _leaves(tensors, f"online_params/{module}")})
            else:
                unmapped.extend(path for path, _ in _leaves(tensors, f"online_params/{module}"))
            continue
        path, kind = target
        for pname, value in tensors.items():
            src = f"online_params/{module}/{pname}"
            tv = _PARAM[kind].get(pname)
            t = _tensor(value)
            if tv is None or (kind == "conv" and t.ndim != 4):
                unmapped.append(src)
            elif kind == "conv":
                put(f"{path}.{tv}", t.permute(3, 2, 0, 1).contiguous(), src)  # HWIO -> OIHW
            else:
                put(f"{path}.{tv}", t.reshape(-1), src)  # (1, 1, 1, C) -> (C,)
        if kind == "batchnorm":
            bn_modules.add(path)

    for module, rest, values in _encoder_modules(state, net, "online_state", dropped):
        bn, _, ema = rest.rpartition("/~/")
        target = _torch_module(bn)
        if target is None or target[1] != "batchnorm" or ema not in _EMA or not isinstance(values, Mapping):
            unmapped.extend(path for path, _ in _leaves(values, f"online_state/{module}"))
            continue
        path = target[0]
        bn_modules.add(path)
        for sname, value in values.items():
            src = f"online_state/{module}/{sname}"
            if sname == "average":
                put(f"{path}.{_EMA[ema]}", _tensor(value).reshape(-1).float(), src)
            elif sname in ("hidden", "counter"):
                dropped[src] = "batch-norm EMA internals (the average is what evaluation uses)"
            else:
                unmapped.append(src)
    for path in bn_modules:
        out[f"{path}.num_batches_tracked"] = torch.zeros((), dtype=torch.int64)

    # The network's depth is in its Haiku name (res_net200), its width multiplier in the stem's
    # channels (64 x width); a name byol_fast does not build is left to infer_backbone to refuse.
    stem = out.get("conv1.weight")
    width = stem.shape[0] // 64 if stem is not None and stem.shape[0] % 64 == 0 else 1
    backbone = re.sub(r"^res_net", "resnet", net) + (f"x{width}" if width > 1 else "")
    if backbone in BACKBONES:
        with torch.device("meta"):
            expected = list(build_encoder(backbone)[0].state_dict())
        # a module torchvision's ResNet of that depth lacks (a projection where it keeps the identity)
        unmapped.extend(source[k] for k in out if k not in expected and k in source)
        # (a batch norm's num_batches_tracked is made here: missing only with the rest of that batch norm)
        missing = [k for k in expected if k not in out and not k.endswith(".num_batches_tracked")]
        if missing:
            names = ", ".join(f"{_source_name(k, net, params)} ({k})" for k in missing[:6])
            raise CheckpointError(f"deepmind layout: the online {net} lacks {len(missing)} backbone tensor"
                                  f"{'s' if len(missing) > 1 else ''}: {names}")
        out = {k: out[k] for k in expected if k in out}
    return Converted(out, "deepmind", dropped, unmapped, padding="same")


def _source_name(key: str, net: str, params: Mapping) -> str:
    """The Haiku name a torchvision key of the encoder comes from, for the message naming a missing one."""
    module, _, tensor = key.rpartition(".")
    m = re.fullmatch(r"layer(\d+)\.(\d+)\.(conv|bn|downsample\.)(\d+)", module)
    if module in ("conv1", "bn1"):
        kind = "conv" if module == "conv1" else "batchnorm"
        haiku = next((str(n)[len(net) + 3:] for n in params if str(n).startswith(f"{net}/~/initial_{kind}")),
                     f"initial_{kind}")
    elif m and m[3] == "downsample.":
        kind = "conv" if m[4] == "0" else "batchnorm"
        haiku = f"block_group_{int(m[1]) - 1}/~/block_{m[2]}/~/shortcut_{kind}"
    elif m:
        kind = "conv" if m[3] == "conv" else "batchnorm"
        haiku = f"block_group_{int(m[1]) - 1}/~/block_{m[2]}/~/{kind}_{int(m[4]) - 1}"
    else:
        return key
    if tensor in ("running_mean", "running_var"):
        ema = "mean_ema" if tensor == "running_mean" else "var_ema"
        return f"online_state/{net}/~/{haiku}/~/{ema}/average"
    pname = {"weight": "w" if kind == "conv" else "scale", "bias": "offset"}[tensor]
    return f"online_params/{net}/~/{haiku}/{pname}"
