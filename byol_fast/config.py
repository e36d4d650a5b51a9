"""Typed, frozen run configuration.

A run's configuration is built in three layers, later ones winning:

1. the dataclass defaults below (the paper's values, docs/reference.md section 1),
2. a YAML recipe (``config/*.yaml``), a nested mapping of sections,
3. command-line overrides ``--section.key=value`` (values parsed as YAML scalars).

Every entry point's schema lives here: :class:`Config` (pretraining), :class:`LinearConfig`
(linear evaluation) and :class:`FinetuneConfig` (fine-tuning); all read images through the one
:class:`ReaderConfig` section. Unknown keys, values of the wrong type, values outside :data:`CHOICES`
and numbers outside :data:`RANGES` stop with a :class:`ConfigError` that names the dotted key and,
where it came from a file, the file; the YAML text itself is read by :mod:`byol_fast.config_files`,
which refuses what no config needs (anchors, deep nesting, megabytes). Derived values (scaled
learning rate, steps per epoch, per-GPU batch) are computed by functions elsewhere and never written back.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Reading recipe files and override values (bounded YAML); offered here too, where callers find them.
from byol_fast.config_files import parse_overrides, quote, read_yaml, shorten, split_overrides  # noqa: F401
from byol_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from byol_fast.errors import ConfigError
from byol_fast.config_ranges import ORDERED, RANGES, check_ranges, interval  # noqa: F401  (the tables, where callers find the config's rules)


@dataclass(frozen=True)
class ViewConfig:
    """Augmentations of one view (BYOL Table 6). Probabilities are per image."""

    crop_area: tuple[float, float] = (0.08, 1.0)  # fraction of the image area, uniform
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio, log-uniform
    flip_p: float = 0.5  # horizontal flip
    jitter_p: float = 0.8  # colour jitter as a whole; its four ops in random order
    brightness: float = 0.4  # factor uniform in [1-b, 1+b] (torchvision's multiplicative form)
    contrast: float = 0.4  # factor uniform in [1-c, 1+c], around the grey mean
    saturation: float = 0.2  # factor uniform in [1-s, 1+s]
    hue: float = 0.1  # shift uniform in [-h, h] of the colour wheel (0.1 = 36 degrees)
    grayscale_p: float = 0.2  # luma copied to the three channels
    blur_p: float = 1.0  # gaussian blur
    blur_kernel: int = 23  # window size in pixels (10% of 224)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # sigma uniform in this range
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5  # x in [0, 1] becomes 1 - x where x >= threshold


VIEW2_DEFAULTS = dict(blur_p=0.1, solarize_p=0.2)


@dataclass(frozen=True)
class DataConfig:
    """Which images pretraining reads and how its two views are made."""

    path: str = "data/demo/train"  # ImageFolder tree (class folders), flat folder, or an index file
    image_size: int = 224  # output side of each view (at the end of a resolution ramp)
    # Resolution ramp, off while start_image_size is 0: the side grows linearly from start_image_size at
    # epoch ramp_start_epoch to image_size at ramp_end_epoch, in steps of 32 px (16 below 64), fixed outside
    start_image_size: int = 0
    ramp_start_epoch: int = 0
    ramp_end_epoch: int = 0
    interp: str = "cubic"  # resize filter of the random resized crop: cubic | linear
    view1: ViewConfig = field(default_factory=ViewConfig)
    view2: ViewConfig = field(default_factory=lambda: ViewConfig(**VIEW2_DEFAULTS))
    mean: tuple[float, float, float] = IMAGENET_MEAN  # on [0, 1] pixels
    std: tuple[float, float, float] = IMAGENET_STD

    def size_at(self, epoch: int) -> int:
        """The views' side in ``epoch`` (counted from 0): the ramp's linear value, rounded to a
        multiple of 32 px (16 below 64) and kept within its two ends; image_size with the ramp off."""
        start, end, first, last = self.start_image_size, self.image_size, self.ramp_start_epoch, self.ramp_end_epoch
        if not start or epoch >= last:
            return end
        if epoch <= first:
            return start
        value = start + (end - start) * (epoch - first) / (last - first)
        step = 16 if value < 64 else 32
        return min(max(int(value / step + 0.5) * step, min(start, end)), max(start, end))

    def sizes(self, epochs: int) -> list[int]:
        """Every epoch's side, epochs 0 .. epochs - 1."""
        return [self.size_at(e) for e in range(epochs)]


@dataclass(frozen=True)
class ReaderConfig:
    """How images are read and decoded: every loader (pretraining, linear evaluation, the kNN
    monitor, the benchmark) takes this section whole."""

    loader: str = "dali"  # dali | torchvision (the PIL reference loaders)
    decode: str = "auto"  # where DALI decodes and augments: auto (gpu when running on CUDA) | cpu | gpu
    num_threads: int = 4  # DALI CPU threads (or DataLoader workers for the torchvision loaders)
    prefetch: int = 2  # batches DALI prepares ahead
    hw_decoder_load: float = 0.65  # share of JPEG decoding sent to the hardware decoder (A100/H100)
    # DALI: build the next epoch's pipeline while the last batches of an epoch are taken (no stall at the
    # boundary; for those moments a second pipeline's memory, on the GPU too: false where that is short)
    build_ahead: bool = True
    index_workers: int = 0  # processes of the dataset-index scan (0 = all cores)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet50"  # torchvision ResNet resnet18 ... resnet152, or tiny_resnet (the CPU demo)
    projector_hidden: int = 4096
    projector_out: int = 256
    predictor_hidden: int = 4096
    # instance (BYOL's loss on pooled vectors) | pixpro (PixPro's on pixels, byol_fast/models/pixpro.py) | instance+pixpro
    loss: str = "instance"
    instance_weight: float = 1.0  # the weights of the two losses in instance+pixpro
    pixpro_weight: float = 1.0
    pixel_hidden: int = 4096  # the pixel projector (1x1 convolutions), PixPro's sizes
    pixel_out: int = 256
    pixpro_gamma: float = 2.0  # sharpness of the pixel propagation's similarity
    pixpro_threshold: float = 0.7  # positive pixels: closer than this many bin diagonals
    # A torchvision ResNet state_dict on disk to start the online and target encoders from (supervised
    # weights); empty: random initialisation. Read without running code, keys checked strictly.
    init: str = field(default="", metadata={"free": True})


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.2  # base learning rate per 256 images: lr_used = lr * batch_size / 256
    weight_decay: float = 1.5e-6
    momentum: float = 0.9
    eta: float = 1e-3  # LARS trust coefficient
    batch_size: int = 4096  # global batch over all GPUs (and accumulation steps)
    accumulate: int = 1  # micro-batches per optimizer step, for GPUs that cannot hold batch/world
    warmup_epochs: float = 10.0


@dataclass(frozen=True)
class EmaConfig:
    tau_base: float = 0.996  # target decay at step 0; rises to 1 on a cosine


@dataclass(frozen=True)
class MonitorConfig:
    """Representation monitors during pretraining (collapse statistics are always logged)."""

    knn_every: int = 0  # epochs between kNN evaluations (0: off); needs a labelled validation split
    knn_k: int = 20
    knn_temperature: float = 0.07  # votes weigh exp(sim / T); <= 0: plain majority
    knn_bank_limit: int = 0  # bank: a seeded random sample of this many training images per process (0: all)
    val_path: str = ""  # labelled validation split; empty: the val/ folder beside data.path
    probe: bool = False  # online linear probe on detached online-encoder features of view 1 (needs class folders)
    probe_lr: float = 0.1  # its SGD learning rate (Nesterov 0.9, constant)


@dataclass(frozen=True)
class Config:
    """Pretraining (``python -m byol_fast.train``). Defaults: the paper's 1000-epoch run."""

    data: DataConfig = field(default_factory=DataConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    epochs: int = 1000
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs); schedules still span all epochs
    out_dir: str = "runs/byol"
    seed: int = 0
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 if supported, else fp16 on CUDA; fp32 on CPU) | bf16 | fp16 | fp32
    channels_last: bool = True
    sync_bn: bool = True  # SyncBatchNorm across GPUs (CUDA only)
    compile: bool = False  # torch.compile the step: forward + loss (and its backward), and LARS + EMA
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    log_every: int = 20  # steps between metric reads (each read is a host sync)
    checkpoint_minutes: float = 15.0  # also written at every epoch end and when a stop signal arrives
    max_nonfinite_steps: int = 20  # stop after this many skipped (non-finite) steps in a row


@dataclass(frozen=True)
class LinearDataConfig:
    """Which labelled images linear evaluation reads and how they are cropped (BYOL Appendix C.1)."""

    path: str = ""  # root holding train/ and val/ ImageFolder trees (--data sets it)
    image_size: int = 224  # crop side, training and validation
    resize: int = 256  # validation: shorter side resized to this, then a center crop of image_size
    crop_area: tuple[float, float] = (0.08, 1.0)  # training random resized crop, fraction of the area
    interp: str = "linear"  # resize filter of crop and validation resize: linear (torchvision's default) | cubic
    mean: tuple[float, float, float] = IMAGENET_MEAN  # on [0, 1] pixels; replaced by the encoder's own
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class LinearConfig:
    """Linear evaluation (``python -m byol_fast.linear_eval``). Defaults: the published protocol."""

    data: LinearDataConfig = field(default_factory=LinearDataConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    checkpoint: str = ""  # pretraining checkpoint, exported state_dict or linear-eval checkpoint
    init: str = "checkpoint"  # checkpoint: its encoder | random: a fresh one (what pretraining bought)
    which: str = "online"  # tower of a pretraining checkpoint: online (the paper's) | target
    backbone: str = ""  # empty: the checkpoint's; needed for init=random without a checkpoint
    features: str = "images"  # images: augmented crops every epoch (the protocol) | cached: center-crop features once
    epochs: int = 90
    batch_size: int = 1024  # global, over all processes
    lr: float = 0.2  # per 256 images: lr_used = lr * batch_size / 256
    holdout: int = 0  # N > 0: validate on N images held out of train/ instead of val/ (choosing lr and epochs)
    momentum: float = 0.9  # Nesterov
    weight_decay: float = 0.0
    head_bn: bool = False  # BatchNorm1d(affine=False) before the linear layer (MAE's probe); still linear
    out_dir: str = ""  # empty: linear/ (linear_random/ for init=random) beside the checkpoint
    seed: int = 0
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # encoder forward: auto (bf16/fp16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    channels_last: bool = True
    log_every: int = 50  # steps between loss reads (each read is a host sync)


@dataclass(frozen=True)
class FinetuneConfig(LinearConfig):
    """Semi-supervised fine-tuning (``python -m byol_fast.finetune``): the whole network, initialised
    from the pretrained encoder, trained with a fraction of the labels (BYOL Appendix C.1, SimCLR's
    protocol): SGD with Nesterov momentum 0.9, no weight decay, random resized crop + flip."""

    label_fraction: float = 0.1  # a seeded, class-balanced sample of the training labels (1.0: all)
    subset: str = ""  # or a file listing the labelled images, one file name per line (the published 1%/10% splits)
    epochs: int = 30
    lr: float = 0.02  # per 256 images
    features: str = "images"  # fine-tuning always trains on augmented crops


TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# The BYOL paper's larger encoders (its Table 1; DeepMind's networks.py): ResNet-<depth> with every
# channel count multiplied by the width after "x" (byol_fast.models.resnet.ScaledResNet).
SCALED_BACKBONES = ("resnet50x2", "resnet50x4", "resnet101x2", "resnet152x2", "resnet200", "resnet200x2")
# tiny_resnet: the CPU demo's (byol_fast.models.resnet.TinyResNet)
BACKBONES = (*TORCHVISION_BACKBONES, *SCALED_BACKBONES, "tiny_resnet")

# The one table of choices: a field of this name, in any section of any schema, takes one of these
# (or stays empty where its default is empty: "not set", e.g. linear evaluation's backbone).
CHOICES = {
    "backbone": BACKBONES,
    "loss": ("instance", "pixpro", "instance+pixpro"),
    "interp": ("cubic", "linear"),
    "loader": ("dali", "torchvision"),
    "decode": ("auto", "cpu", "gpu"),
    "device": ("auto", "cuda", "cpu"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "init": ("checkpoint", "random"),
    "which": ("online", "target"),
    "features": ("images", "cached"),
    "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}

INT64 = (-(2**63), 2**63 - 1)  # every int of a config fits a tensor or a C long

# Keys that moved to the reader section: an old recipe gets told where they went.
MOVED = {f"data.{k}": f"reader.{k}" for k in ("loader", "decode", "num_threads", "prefetch", "hw_decoder_load")}
MOVED["data.workers"] = "reader.index_workers"


# ---------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


# Numbers such as 5e-4 or 1E6, which PyYAML (YAML 1.1) leaves as strings for want of a dot.
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in that type."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {_type_name(tp)} keys, got {quote(value)}")
        return _build(tp, value, key + ".")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {quote(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in the config")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT64[0] <= value <= INT64[1]:
                raise ConfigError(f"{key}: {quote(value)} does not fit in 64 bits")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an int of hundreds of digits
                raise ConfigError(f"{key}: {quote(value)} is too large for a float") from None
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)  # 5e-4: YAML 1.1 reads exponents without a dot as strings
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {quote(value)} ({type(value).__name__})")


def _build(cls: type, values: dict, prefix: str = ""):
    """Make ``cls`` from the defaults overlaid with ``values`` (nested dicts)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names, key=str)  # YAML keys may be numbers or null, too
    if unknown:
        key = prefix + str(unknown[0])
        if key in MOVED:
            raise ConfigError(f"config key '{key}' is now '{MOVED[key]}' (the reader section: how images are read)")
        raise ConfigError(f"unknown config key {quote(key)} (known in this section: {', '.join(sorted(names))})")
    default = cls()
    kwargs = {}
    for name in names:
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], prefix + name)
        else:
            kwargs[name] = getattr(default, name)
    # A partial view2 section overrides the view2 defaults, not view1's.
    if cls is DataConfig and "view2" in values:
        kwargs["view2"] = _coerce({**VIEW2_DEFAULTS, **values["view2"]}, ViewConfig, prefix + "view2")
    obj = cls(**kwargs)
    _check_choices(obj, prefix)
    check_ranges(obj, prefix)
    if cls is ViewConfig:
        _check_view(obj, prefix)
    if cls is DataConfig and obj.start_image_size and obj.ramp_start_epoch > obj.ramp_end_epoch:
        raise ConfigError(f"{prefix}ramp_end_epoch: {obj.ramp_end_epoch} is before ramp_start_epoch "
                          f"({obj.ramp_start_epoch}); the ramp runs from the one to the other")
    return obj


def _check_view(view: ViewConfig, prefix: str) -> None:
    """The blur as torchvision and the paper define it: an odd window (its sigma range: RANGES, ORDERED)."""
    if view.blur_kernel % 2 == 0:
        raise ConfigError(f"{prefix}blur_kernel: {view.blur_kernel} is not an odd number of pixels")


def _check_choices(obj, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if (f.name not in CHOICES or dataclasses.is_dataclass(value) or (value == "" and f.default == "")
                or f.metadata.get("free")):
            continue
        if value not in CHOICES[f.name]:
            raise ConfigError(f"{prefix}{f.name}: {quote(value)} is not one of {', '.join(CHOICES[f.name])}")


def _check_linear(cfg: LinearConfig) -> None:
    """What linear evaluation needs beyond well-typed values: a source of weights and data."""
    if not cfg.data.path:
        raise ConfigError("data.path: give the dataset root (train/ and val/ inside) with --data DATA")
    if cfg.init == "checkpoint" and not cfg.checkpoint:
        raise ConfigError("checkpoint: give --checkpoint RUN/last.pt (or --init random for the baseline)")
    if not cfg.checkpoint and not cfg.backbone:
        raise ConfigError("backbone: --init random without --checkpoint needs --backbone=resnet50 (or another)")
    if not cfg.checkpoint and not cfg.out_dir:
        raise ConfigError("out_dir: --init random without --checkpoint needs --out_dir")


def _check_finetune(cfg: FinetuneConfig) -> None:
    _check_linear(cfg)
    if cfg.features != "images":
        raise ConfigError("features: fine-tuning trains the encoder, so it needs images, not cached features")


# Checks across the keys of a complete configuration, for the run about to start (a recipe on its
# own may leave run-specific keys, such as the checkpoint, empty).
WHOLE_CHECKS = {LinearConfig: _check_linear, FinetuneConfig: _check_finetune}


def validate(cfg) -> None:
    """Raise ConfigError if ``cfg`` cannot start a run (beyond types, choices and ranges, checked when built)."""
    check = WHOLE_CHECKS.get(type(cfg))
    if check:
        check(cfg)


def merge(base: dict, extra: dict) -> dict:
    """Nested dicts: ``extra`` wins, section by section."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None, cls: type = Config):
    """Defaults <- YAML file <- overrides; raises ConfigError naming the bad key (and file)."""
    values: dict = {}
    if path:
        values = read_yaml(path)
        try:
            _build(cls, values)
        except ConfigError as e:
            raise ConfigError(f"{shorten(str(path))}: {e}") from None
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        values = merge(values, extra)
    return _build(cls, values)


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) for YAML, JSON and checkpoints."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
