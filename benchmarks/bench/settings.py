"""What a run measures and how: the parsed command line as :class:`Options`, with the resolved
:class:`Settings` (recorded in the JSON as ``settings``) and the :class:`Recipe` each stage's
byol_fast Config is built from."""
from __future__ import annotations

import argparse
import dataclasses
import os

from byol_fast.config import Config, load_config, merge, parse_overrides
from byol_fast.runtime.device import resolve_device

from .entries import parse_stage, stage_list, stage_overrides


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting the run uses, defaults filled in by device type; its fields, in this order, are
    the JSON's ``settings``."""

    device: str  # cuda | cpu
    stages: tuple[str, ...]  # the --stages entries, in the order they run
    backbone: str
    image_size: int  # the largest of image_sizes: an entry's side without size=, the ratios' side
    image_sizes: tuple[int, ...]  # --image-size's list: each image-making entry once per side
    batch: int
    decode: str  # where DALI decodes: cpu | gpu
    threads: int  # DALI threads = DataLoader workers
    torch_threads: int
    cores: int
    num_images: int
    windows: int
    window_seconds: float
    warmup: int
    warmup_given: bool  # else a compiled stage variant warms up for 10 steps
    time_budget: float | None
    stage_timeout: float | None
    stage_reserve: float
    checkpoint_repeats: int
    cudnn_benchmark: bool
    quick: bool
    seed: int

    def record(self) -> dict:
        """The settings as the JSON records them."""
        return {**dataclasses.asdict(self), "stages": list(self.stages), "image_sizes": list(self.image_sizes)}


def resolve(args: argparse.Namespace) -> Settings:
    """Every setting the run uses from the command line, defaults filled in by device type."""
    cuda = resolve_device(args.device).type == "cuda"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sizes = tuple(args.image_size or (224 if cuda else 64,))
    stages = stage_list(args.stages, args.linear, sizes)
    quick = args.quick
    return Settings(
        device="cuda" if cuda else "cpu",
        stages=tuple(stages),
        backbone=args.backbone or ("resnet50" if cuda else "resnet18"),
        image_size=max(sizes),
        image_sizes=sizes,
        batch=args.batch or (256 if cuda else 32),
        decode=args.decode or ("gpu" if cuda else "cpu"),
        threads=args.threads or cores,
        torch_threads=args.torch_threads or cores,
        cores=cores,
        num_images=args.num_images or ((1000 if quick else 4000) if cuda else (256 if quick else 1000)),
        windows=args.windows or (3 if quick else 5),
        window_seconds=args.window_seconds or (1.0 if quick else 3.0),
        warmup=args.warmup if args.warmup is not None else (10 if args.compile or args.compile_mode else 3),
        warmup_given=args.warmup is not None,
        time_budget=args.time_budget,
        stage_timeout=args.stage_timeout,
        stage_reserve=args.stage_reserve,
        checkpoint_repeats=args.checkpoint_repeats,
        cudnn_benchmark=args.cudnn_benchmark,
        quick=quick,
        seed=args.seed,
    )


def blur_kernel_for(size: int) -> int:
    """The paper's blur window is 10% of the view side (23 at 224), made odd."""
    return 23 if size == 224 else max(3, round(size / 10) | 1)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a stage's byol_fast Config is made: the YAML recipe (``--config``) <- the benchmark's
    settings and config options <- the extra ``--section.key=value`` overrides <- the stage variant's
    overrides, checked by the config's own rules. How images are read (threads, decode, prefetch,
    hardware decoder) lives in its ``reader`` section, which every loader, the linear one included,
    takes whole."""

    settings: Settings
    config_path: str | None
    overrides: tuple[str, ...]  # the extra --section.key=value arguments, as given
    precision: str | None
    compile: bool
    compile_mode: str | None
    channels_last: bool
    prefetch: int | None
    hw_decoder_load: float | None

    def config(self, stage: dict | None = None) -> Config:
        """The Config of the run (``stage`` None) or of a stage variant (``stage``: its
        :func:`~bench.entries.stage_overrides`)."""
        s = self.settings
        reader = {"num_threads": s.threads, "decode": s.decode, "prefetch": self.prefetch,
                  "hw_decoder_load": self.hw_decoder_load}
        over: dict = {"device": s.device, "seed": s.seed,
                      "model": {"backbone": s.backbone},
                      "optim": {"batch_size": s.batch},
                      "data": {"image_size": s.image_size},
                      "reader": {k: v for k, v in reader.items() if v is not None}}
        if not self.config_path:  # the recipe's views as they are; else scale the blur window with the view
            k = blur_kernel_for((stage or {}).get("data", {}).get("image_size", s.image_size))
            over["data"].update(view1={"blur_kernel": k}, view2={"blur_kernel": k})
        if self.precision:
            over["precision"] = self.precision
        if self.compile or self.compile_mode:
            over["compile"] = True
        if self.compile_mode:
            over["compile_mode"] = self.compile_mode
        if not self.channels_last:
            over["channels_last"] = False
        return load_config(self.config_path, merge(merge(over, parse_overrides(list(self.overrides))), stage or {}))


@dataclasses.dataclass(frozen=True)
class Options:
    """The whole command line: settings, config recipe, the images to read and where results go."""

    settings: Settings
    recipe: Recipe
    data: str | None  # a folder or index file instead of generated images
    bench_data: str  # where generated images (and the run's scratch files) go
    json: str | None
    plot: str | None


def from_args(args: argparse.Namespace, extra: list[str]) -> Options:
    """The run's options from the parsed command line and its extra config overrides. Raises
    ConfigError before any work when a setting, a stage entry or any variant's config is wrong."""
    settings = resolve(args)
    recipe = Recipe(settings, args.config, tuple(extra), args.precision, args.compile, args.compile_mode,
                    not args.no_channels_last, args.prefetch, args.hw_decoder_load)
    recipe.config()
    for key in settings.stages:  # every variant's config is checked (compile mode, batch) before any work
        recipe.config(stage_overrides(parse_stage(key).options))
    return Options(settings, recipe, args.data, args.bench_data, args.json, args.plot)
