"""The stages by name, and the entries of ``--stages``: ``NAME[:key=value...]``, a stage and the
options of one variant of it (``model:batch=512:compile=default``), checked before any work."""
from __future__ import annotations

from typing import Callable, NamedTuple

from byol_fast.config import BACKBONES
from byol_fast.datasets.shard_pack import parse_size
from byol_fast.errors import ConfigError

STAGES = ("dali", "shards", "torchvision", "model", "e2e-dali", "e2e-torchvision", "linear", "e2e-linear", "checkpoint")
LINEAR_STAGES = ("linear", "e2e-linear")
OPT_IN_STAGES = LINEAR_STAGES + ("checkpoint",)  # not in the default list
LABELS = {
    "dali": "DALI two-view loader",
    "shards": "DALI two-view loader, shard set",
    "torchvision": "torchvision/PIL loader",
    "model": "training step (synthetic)",
    "e2e-dali": "end to end, DALI",
    "e2e-torchvision": "end to end, torchvision",
    "linear": "linear eval step (synthetic)",
    "e2e-linear": "linear eval end to end, DALI",
    "checkpoint": "checkpoint pause (BYOL learner state)",
}
BYOL_STEP_STAGES = ("model", "e2e-dali", "e2e-torchvision")  # the stages that run Learner.step
LOADER_STAGES = ("dali", "shards", "torchvision", "e2e-dali", "e2e-torchvision", "e2e-linear")
DALI_STAGES = ("dali", "shards", "e2e-dali", "e2e-linear")
IMAGE_STAGES = tuple(s for s in STAGES if s != "checkpoint")  # the stages that make images of a side


def _int(lo: int) -> Callable[[str], int]:
    def conv(v: str) -> int:
        n = int(v)
        if n < lo:
            raise ValueError(f"must be >= {lo}")
        return n
    return conv


def _float_in(lo: float, hi: float, open_lo: bool = False) -> Callable[[str], float]:
    def conv(v: str) -> float:
        x = float(v)
        if not (lo < x if open_lo else lo <= x) or x > hi:
            raise ValueError(f"must be in {'(' if open_lo else '['}{lo}, {hi}]")
        return x
    return conv


def _timeout(v: str) -> float | str:
    return "rest" if v == "rest" else _float_in(0.0, 1e9, open_lo=True)(v)


def _compile(v: str) -> str | bool:
    return False if v in ("off", "false", "eager") else v  # a mode name, checked by the config


def _size(v: str) -> int:
    try:
        return parse_size(v)
    except ValueError:
        raise ValueError("not a size (e.g. 64MB, 256MiB, 1GB)") from None


def _loss(v: str) -> str:
    if v not in ("instance", "pixpro", "instance+pixpro"):
        raise ValueError("instance, pixpro or instance+pixpro")
    return v


def _backbone(v: str) -> str:
    if v not in BACKBONES:
        raise ValueError(f"one of {', '.join(BACKBONES)}")
    return v


def _step(v: str) -> str:
    if v != "best":
        raise ValueError("only 'best' (the fastest model variant measured before this stage)")
    return v


# key -> (converter, stages it applies to): an option a stage would ignore is refused, not silently dropped.
STAGE_OPTIONS = {
    "batch": (_int(1), STAGES),
    "compile": (_compile, BYOL_STEP_STAGES),
    "step": (_step, ("e2e-dali", "e2e-torchvision")),
    "hw": (_float_in(0.0, 1.0), DALI_STAGES),
    "threads": (_int(1), LOADER_STAGES),
    "prefetch": (_int(1), DALI_STAGES),
    "shard_size": (_size, ("shards",)),
    "loss": (_loss, ("model",)),
    "backbone": (_backbone, ("model",)),
    "size": (_int(8), IMAGE_STAGES),
    "windows": (_int(1), STAGES),
    "window_seconds": (_float_in(0.0, 1e6, open_lo=True), STAGES),
    "warmup": (_int(0), STAGES),
    "timeout": (_timeout, STAGES),
}


class Entry(NamedTuple):
    """One ``--stages`` entry: the stage's name and its variant's options, converted."""

    name: str
    options: dict


def parse_stage(key: str) -> Entry:
    """``'model:batch=384:compile=default'`` -> ``('model', {'batch': 384, 'compile': 'default'})``."""
    name, *pairs = key.split(":")
    if name not in STAGES:
        raise ConfigError(f"--stages: unknown stage {name!r} (choose from {', '.join(STAGES)})")
    opts: dict = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or k not in STAGE_OPTIONS:
            raise ConfigError(f"--stages: {key!r}: {pair!r} is not key=value with a key of {', '.join(STAGE_OPTIONS)}")
        conv, applies = STAGE_OPTIONS[k]
        if name not in applies:
            raise ConfigError(f"--stages: {key!r}: {k}= does not apply to the {name} stage")
        try:
            opts[k] = conv(v)
        except ValueError as e:
            raise ConfigError(f"--stages: {key!r}: {k}={v!r}: {e}") from None
    return Entry(name, opts)


def stage_overrides(opts: dict) -> dict:
    """The config overrides of a stage's options (the rest are measurement settings)."""
    over: dict = {}
    if "batch" in opts:
        over["optim"] = {"batch_size": opts["batch"]}
    if "compile" in opts:
        over["compile"] = opts["compile"] is not False
        if opts["compile"]:
            over["compile_mode"] = opts["compile"]
    reader = {dst: opts[src] for src, dst in (("hw", "hw_decoder_load"), ("threads", "num_threads"),
                                               ("prefetch", "prefetch")) if src in opts}
    if reader:
        over["reader"] = reader
    model = {k: opts[k] for k in ("loss", "backbone") if k in opts}
    if model:
        over["model"] = model
    if "size" in opts:
        over["data"] = {"image_size": opts["size"]}
    return over


def stage_list(stages: str, linear: bool, sizes: tuple[int, ...] = ()) -> list[str]:
    """The entries of ``--stages`` (default: every stage but the opt-in ones) and, with ``--linear``,
    the linear stages; with several ``sizes`` (``--image-size 160,192,224``), each entry that makes
    images and names no size of its own once per size (``dali:size=160``, ...). Every entry checked,
    none twice."""
    keys = [s.strip() for s in stages.split(",") if s.strip()] or [s for s in STAGES if s not in OPT_IN_STAGES]
    if linear:
        keys += [s for s in LINEAR_STAGES if s not in keys]
    if len(sizes) > 1:
        keys = [variant for key in keys for variant in _per_size(key, sizes)]
    for key in keys:
        parse_stage(key)  # every entry checked before any work
    if len(set(keys)) < len(keys):
        raise ConfigError(f"--stages: {next(k for k in keys if keys.count(k) > 1)!r} is given twice")
    return keys


def _per_size(key: str, sizes: tuple[int, ...]) -> list[str]:
    """``key`` once per size, or as it is when its stage makes no images or it names its own size."""
    entry = parse_stage(key)
    if entry.name not in IMAGE_STAGES or "size" in entry.options:
        return [key]
    return [f"{key}:size={n}" for n in sizes]
