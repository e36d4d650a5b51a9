"""Linear evaluation: a linear classifier trained on the frozen pretrained encoder.

``python -m byol_fast.linear_eval --checkpoint RUN/last.pt --data DATA [--init random] [--config C] [--key=value ...]``

DATA holds ``train/`` and ``val/`` ImageFolder trees with the same class folders. The protocol is the
one behind the published top-1 (REFERENCE.md section 1, BYOL Appendix C.1):

- the encoder is frozen: eval mode (batch norm uses its running statistics), no gradients;
- a linear layer on its pooled features (2048-d for ResNet-50), initialised N(0, 0.01), bias 0;
- training images: random resized crop + horizontal flip; validation: resize the shorter side to
  256, center crop 224;
- SGD, Nesterov momentum 0.9, no weight decay, batch 1024, cosine decay per step without warm-up,
  lr = 0.2 x batch / 256 (DeepMind's eval config; the paper sweeps {0.05, ..., 0.4} and reports
  the best); 90 epochs here (DeepMind: 80; mmpretrain: 90).

Top-1 and top-5 on the validation split are printed, written to TensorBoard and to
``results.json`` after every epoch. ``last.pt`` (atomic, every epoch) holds the classifier, the
optimizer, the encoder it was trained on and the RNG; the run resumes from its folder by itself.
A preempted run (SIGTERM/SIGUSR1) exits with status 75 and repeats the interrupted epoch on resume.
Multi-GPU: one process per GPU under torchrun; the classifier is wrapped in DDP, the encoder is
replicated, each rank reads its shard of both splits.

``--features=cached`` is a fast path for small datasets on the CPU: features of center crops of the
training images are computed once and the classifier trains on them (the encoder is frozen, so
they never change); it skips the training augmentation, so it is not the published protocol.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from pipelines.loader import steps_per_epoch as training_steps

from . import checkpoint as ckpt
from . import dist
from .config import ConfigError, load_config, parse_overrides, to_dict, to_yaml
from .data import DatasetError, checked_index
from .constants import IMAGENET_MEAN, IMAGENET_STD
from .features import (LINEAR_KIND, EncoderWeights, build_frozen_encoder, freeze, loader_features,
                       read_encoder_weights)
from .learner import resolve_precision
from .metrics import Throughput, Writer
from .model import build_encoder
from .monitors import topk_correct
from .schedules import lr_at, scaled_lr
from .train import PREEMPTED_EXIT, decode_device, resolve_device, stop_on_signals

RESULTS = "results.json"


# ---------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class LinearDataConfig:
    """Where the labelled images come from and how they are read."""

    path: str = ""  # root holding train/ and val/ ImageFolder trees (--data sets it)
    image_size: int = 224  # crop side, training and validation
    resize: int = 256  # validation: shorter side resized to this, then a center crop of image_size
    crop_area: tuple[float, float] = (0.08, 1.0)  # training random resized crop, fraction of the area
    interp: str = "linear"  # resize filter of crop and validation resize: linear (torchvision's default) | cubic
    mean: tuple[float, float, float] = IMAGENET_MEAN  # on [0, 1] pixels; the encoder's, as pretraining
    std: tuple[float, float, float] = IMAGENET_STD
    loader: str = "dali"  # dali | torchvision (PIL + torchvision transforms)
    decode: str = "auto"  # where DALI decodes: auto (gpu when running on CUDA) | cpu | gpu
    num_threads: int = 4  # DALI CPU threads, or DataLoader workers for the torchvision loader
    prefetch: int = 2  # batches DALI prepares ahead
    hw_decoder_load: float = 0.65  # share of JPEG decoding sent to the hardware decoder (A100/H100)


@dataclass(frozen=True)
class LinearConfig:
    data: LinearDataConfig = field(default_factory=LinearDataConfig)
    checkpoint: str = ""  # pretraining checkpoint, exported state_dict or linear-eval checkpoint
    init: str = "checkpoint"  # checkpoint: its encoder | random: a fresh one (what pretraining bought)
    which: str = "online"  # tower of a pretraining checkpoint: online (the paper's) | target
    backbone: str = ""  # empty: the checkpoint's; needed for init=random without a checkpoint
    features: str = "images"  # images: augmented crops every epoch (the protocol) | cached: center-crop features once
    epochs: int = 90
    batch_size: int = 1024  # global, over all processes
    lr: float = 0.2  # per 256 images: lr_used = lr * batch_size / 256
    momentum: float = 0.9  # Nesterov
    weight_decay: float = 0.0
    head_bn: bool = False  # BatchNorm1d(affine=False) before the linear layer (MAE's probe); still linear
    out_dir: str = ""  # empty: linear/ (linear_random/ for init=random) beside the checkpoint
    seed: int = 0
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # encoder forward: auto (bf16/fp16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    channels_last: bool = True
    log_every: int = 50  # steps between loss reads (each read is a host sync)


LINEAR_CHOICES = {"init": ("checkpoint", "random"), "which": ("online", "target"), "features": ("images", "cached")}


def check_config(cfg: LinearConfig) -> None:
    """The checks load_config cannot do: choices of this module and a usable source and data."""
    for key, allowed in LINEAR_CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key}: {getattr(cfg, key)!r} is not one of {', '.join(allowed)}")
    if not cfg.data.path:
        raise ConfigError("data.path: give the dataset root (train/ and val/ inside) with --data DATA")
    if cfg.init == "checkpoint" and not cfg.checkpoint:
        raise ConfigError("checkpoint: give --checkpoint RUN/last.pt (or --init random for the baseline)")
    if not cfg.checkpoint and not cfg.backbone:
        raise ConfigError("backbone: --init random without --checkpoint needs --backbone=resnet50 (or another)")
    if not cfg.checkpoint and not cfg.out_dir:
        raise ConfigError("out_dir: --init random without --checkpoint needs --out_dir")


def output_dir(cfg: LinearConfig) -> Path:
    """``out_dir``, or ``linear/`` (``linear_random/``) beside the checkpoint."""
    if cfg.out_dir:
        return Path(cfg.out_dir)
    return Path(cfg.checkpoint).parent / ("linear" if cfg.init == "checkpoint" else "linear_random")


def per_process_batch(cfg: LinearConfig, world_size: int) -> int:
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch_size: {cfg.batch_size} does not divide into {world_size} processes")
    return cfg.batch_size // world_size


# ---------------------------------------------------------------------------- data


def split_index(root: str | Path, split: str, info: dist.DistInfo):
    """The checked index (byol_fast.data) of ``root/split``, built by rank 0 only; it must be a
    labelled class tree."""
    index = checked_index(Path(root) / split, info)
    if not index.labelled:
        raise ConfigError(f"data.path: {Path(root) / split} has no class folders; linear evaluation needs labels")
    return index


class FolderLoader:
    """(images (B, 3, H, W) float32 normalised, labels (B,) int64) of this process's shard, read with PIL.

    The torchvision reference for the DALI pipelines (``data.loader=torchvision``), and the loader
    on machines without DALI. ``train``: random resized crop + flip, reshuffled each epoch, the same
    number of full batches on every rank (collectives need it); otherwise resize + center crop, in
    order, every image exactly once over all ranks.
    """

    def __init__(self, files, labels, train: bool, data: LinearDataConfig, batch: int, rank: int = 0,
                 world: int = 1, seed: int = 0):
        self.files, self.labels, self.train = list(files), list(labels), train
        self.batch, self.rank, self.world, self.seed, self.workers = batch, rank, world, seed, data.num_threads
        self.transform = folder_transform(data, train)
        self.epoch = 0

    @property
    def steps_per_epoch(self) -> int:
        if self.train:
            return training_steps(len(self.files), self.batch, self.world)
        return math.ceil(len(range(self.rank, len(self.files), self.world)) / self.batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard(self) -> list[int]:
        if not self.train:
            return list(range(self.rank, len(self.files), self.world))
        g = torch.Generator().manual_seed(self.seed + self.epoch)  # same order on every rank
        order = torch.randperm(len(self.files), generator=g).tolist()
        return order[self.rank:self.steps_per_epoch * self.batch * self.world:self.world]

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        shard = self._shard()
        dataset = _Images([self.files[i] for i in shard], [self.labels[i] for i in shard], self.transform)
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch, shuffle=False, drop_last=self.train,
                                             num_workers=self.workers, persistent_workers=False)
        yield from loader


def folder_transform(data: LinearDataConfig, train: bool):
    """torchvision transforms of the protocol: PIL image -> normalised float tensor (3, S, S)."""
    from torchvision import transforms as T

    from pipelines.reference import INTERP

    if train:
        geometry = [T.RandomResizedCrop(data.image_size, scale=data.crop_area, interpolation=INTERP[data.interp]),
                    T.RandomHorizontalFlip()]
    else:
        geometry = [T.Resize(data.resize, interpolation=INTERP[data.interp]), T.CenterCrop(data.image_size)]
    return T.Compose(geometry + [T.ToTensor(), T.Normalize(data.mean, data.std)])


class _Images(torch.utils.data.Dataset):
    def __init__(self, files, labels, transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB")), self.labels[i]


def eval_loader(index, train: bool, data: LinearDataConfig, batch: int, info: dist.DistInfo,
                device: torch.device, seed: int = 0):
    """This rank's loader of one split: DALI (data.loader=dali) or PIL/torchvision.

    Yields (images (B, 3, S, S) float32 normalised, labels (B,) int64); ``train`` picks the
    augmented training recipe, else resize + center crop. Also used by the kNN monitor.
    """
    if data.loader == "torchvision":
        return FolderLoader(index.files, index.labels, train, data, batch, info.rank, info.world_size, seed)
    from pipelines.linear_eval import DaliLinearLoader

    where = decode_device(data, device)
    if where == "gpu" and device.type != "cuda":
        raise ConfigError("data.decode: 'gpu' needs a CUDA GPU")
    return DaliLinearLoader(index.files, index.labels, train, data, batch, where, info.rank, info.world_size,
                            info.local_rank, seed, device)


# ---------------------------------------------------------------------------- the classifier


def make_head(width: int, num_classes: int, head_bn: bool) -> nn.Module:
    """Linear(width, classes), N(0, 0.01) weights and zero bias (MoCo/DINO), optionally after a
    BatchNorm1d without affine parameters: a fixed per-feature standardisation at test time, so the
    classifier stays linear in the features."""
    linear = nn.Linear(width, num_classes)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(width, affine=False), linear) if head_bn else nn.Sequential(linear)


def encoder_weights(cfg: LinearConfig) -> EncoderWeights | None:
    """The encoder's weights from ``cfg.checkpoint`` (None when there is no checkpoint)."""
    if not cfg.checkpoint:
        return None
    return read_encoder_weights(cfg.checkpoint, cfg.which, cfg.backbone or None)


def make_encoder(cfg: LinearConfig, weights: EncoderWeights | None) -> tuple[nn.Module, int, str]:
    """(frozen encoder, width, backbone name): the checkpoint's or, for init=random, a seeded fresh one."""
    if cfg.init == "checkpoint":
        encoder, width = build_frozen_encoder(weights, cfg.checkpoint)
        return encoder, width, weights.backbone
    name = cfg.backbone or weights.backbone
    torch.manual_seed(cfg.seed)  # the same random encoder on every rank and every resume
    encoder, width = build_encoder(name)
    return freeze(encoder), width, name


# ---------------------------------------------------------------------------- the run


class LinearEval:
    """One linear-evaluation process: frozen encoder, classifier, loaders; :meth:`fit` is the loop."""

    def __init__(self, cfg: LinearConfig):
        check_config(cfg)
        self.cfg = cfg
        torch.manual_seed(cfg.seed)  # the classifier's initialisation (DDP then copies rank 0's)
        device = resolve_device(cfg)
        self.info = dist.setup(device)
        self.device = dist.local_device(device, self.info)
        self.out = output_dir(cfg)
        self.amp_dtype = resolve_precision(cfg, self.device)
        self.log(f"byol_fast {ckpt.git_revision()} | linear evaluation | {self.info.world_size} process(es) "
                 f"on {self.device}\nresolved config:\n{to_yaml(cfg)}")

        weights = encoder_weights(cfg)
        self.encoder, self.width, self.backbone = make_encoder(cfg, weights)
        self.mean_std = (tuple(weights.mean), tuple(weights.std)) if weights else (cfg.data.mean, cfg.data.std)
        self.encoder.to(self.device, memory_format=self._memory_format())
        data = self._data_config()
        self.train_index, self.val_index = (split_index(data.path, "train", self.info),
                                            split_index(data.path, "val", self.info))
        if self.train_index.classes != self.val_index.classes:
            raise ConfigError(f"data.path: train/ and val/ of {data.path} have different class folders")
        self.num_classes = self.train_index.num_classes

        self.batch = per_process_batch(cfg, self.info.world_size)
        if len(self.train_index) < cfg.batch_size:
            raise ConfigError(f"batch_size: {cfg.batch_size} is more than the {len(self.train_index)} training images")
        self.head = dist.wrap(make_head(self.width, self.num_classes, cfg.head_bn), self.device, self.info,
                              sync_bn=True, channels_last=False)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=0.0, momentum=cfg.momentum, nesterov=True,
                                         weight_decay=cfg.weight_decay)
        self._build_data(data)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.peak_lr = scaled_lr(cfg.lr, cfg.batch_size)
        self.epoch, self.results, self.stop_requested = 0, [], False
        self.writer = Writer(str(self.out), self.info.is_main)
        self.resume()

    def log(self, msg: str) -> None:
        if self.info.is_main:
            print(msg, flush=True)

    def _memory_format(self):
        on_cuda = self.device.type == "cuda" and self.cfg.channels_last
        return torch.channels_last if on_cuda else torch.contiguous_format

    def _data_config(self) -> LinearDataConfig:
        """The data section with the encoder's own normalisation (from its checkpoint)."""
        import dataclasses

        mean, std = self.mean_std
        return dataclasses.replace(self.cfg.data, mean=mean, std=std)

    # ------------------------------------------------------------------ data

    def _build_data(self, data: LinearDataConfig) -> None:
        """Images mode: two loaders. Cached mode: features of center crops, computed here once."""
        cfg, info = self.cfg, self.info
        self.val_loader = eval_loader(self.val_index, False, data, self.batch, info, self.device, cfg.seed)
        if cfg.features == "images":
            self.train_loader = eval_loader(self.train_index, True, data, self.batch, info, self.device, cfg.seed)
            self.steps_per_epoch = self.train_loader.steps_per_epoch
            return
        start = time.perf_counter()
        plain = eval_loader(self.train_index, False, data, self.batch, info, self.device, cfg.seed)
        self.train_feats = loader_features(self.encoder, plain, self.device, self.amp_dtype)
        self.val_feats = loader_features(self.encoder, self.val_loader, self.device, self.amp_dtype)
        # Every rank takes the same number of steps: whole global batches, as the image loaders.
        self.steps_per_epoch = training_steps(len(self.train_index), self.batch, info.world_size)
        self.log(f"cached features of {len(self.train_index)} train and {len(self.val_index)} val images "
                 f"in {time.perf_counter() - start:.1f} s")

    def _train_batches(self):
        """This epoch's (features (B, F) float32, labels (B,)) batches, on the device."""
        if self.cfg.features == "cached":
            feats, labels = self.train_feats
            g = torch.Generator().manual_seed(self.cfg.seed + 1000 * self.epoch + self.info.rank)
            order = torch.randperm(len(labels), generator=g).to(self.device)
            for i in range(self.steps_per_epoch):
                idx = order[i * self.batch:(i + 1) * self.batch]
                yield feats[idx], labels[idx]
            return
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(self.epoch)
        for images, labels in self.train_loader:
            yield self.encode(images), labels.to(self.device, non_blocking=True)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen encoder: images (B, 3, S, S) -> features (B, F) float32 (the classifier runs in fp32)."""
        images = images.to(self.device, non_blocking=True, memory_format=self._memory_format())
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
            return self.encoder(images).float()

    # ------------------------------------------------------------------ checkpoints

    def source(self) -> dict:
        """What the classifier was trained on; a resumed run must match it."""
        return {"checkpoint": str(self.cfg.checkpoint), "init": self.cfg.init, "which": self.cfg.which,
                "backbone": self.backbone, "features": self.cfg.features}

    def save(self) -> None:
        if not self.info.is_main:
            return
        state = {"kind": LINEAR_KIND, "encoder": self.encoder.state_dict(), "backbone": self.backbone,
                 "mean": list(self.mean_std[0]), "std": list(self.mean_std[1]), "classes": self.train_index.classes,
                 "head": dist.unwrap(self.head).state_dict(), "optimizer": self.optimizer.state_dict(),
                 "epoch": self.epoch, "results": self.results, "source": self.source(), "config": to_dict(self.cfg),
                 "rng": ckpt.rng_state(), "git": ckpt.git_revision()}
        ckpt.atomic_save(state, self.out / ckpt.LAST)

    def resume(self) -> None:
        path = self.out / ckpt.LAST
        if not path.exists():
            return
        state = ckpt.load(path)
        if state.get("kind") != LINEAR_KIND or state.get("source") != self.source():
            raise ckpt.CheckpointError(f"{path} holds another evaluation ({state.get('source')}); "
                                       f"this run is {self.source()}: use another out_dir")
        # The stored encoder is the one the classifier was trained on (a random init included).
        self.encoder.load_state_dict(state["encoder"], strict=True)
        dist.unwrap(self.head).load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        ckpt.set_rng_state(state["rng"])
        self.epoch, self.results = state["epoch"], state["results"]
        self.log(f"resumed from {path} after epoch {self.epoch}")

    def write_results(self) -> None:
        if not self.info.is_main:
            return
        best = max(self.results, key=lambda r: r["top1"])
        doc = {"source": self.source(), "num_classes": self.num_classes, "train_images": len(self.train_index),
               "val_images": len(self.val_index), "final": self.results[-1], "best": best, "epochs": self.results,
               "config": to_dict(self.cfg), "git": ckpt.git_revision()}
        tmp = self.out / f".{RESULTS}.tmp"
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(self.out / RESULTS)

    # ------------------------------------------------------------------ the loop

    def _read_and_agree(self, loss: torch.Tensor) -> tuple[float, bool]:
        """(mean loss over the ranks, whether any rank was asked to stop): one all-reduce and one
        host sync. All ranks stop at the same step, or DDP's collectives would deadlock."""
        both = torch.stack([loss.float(), torch.full_like(loss, float(self.stop_requested), dtype=torch.float32)])
        if tdist.is_initialized():
            tdist.all_reduce(both)  # sums: the loss is divided below, any stop flag stays > 0
        mean, stop = both.tolist()
        return mean / self.info.world_size, stop > 0

    def fit(self) -> int:
        cfg = self.cfg
        stop_on_signals(self, "stopping; the interrupted epoch repeats on resume")
        self.log(f"{self.backbone} ({cfg.init}) -> linear {self.width} x {self.num_classes}; "
                 f"{len(self.train_index)} train / {len(self.val_index)} val images; {self.steps_per_epoch} "
                 f"steps/epoch x {cfg.epochs} epochs; batch {cfg.batch_size}; peak lr {self.peak_lr:g}; "
                 f"features {cfg.features}; encoder precision {self.amp_dtype}")
        while self.epoch < cfg.epochs:
            train = self.train_epoch()
            if train is None:
                return PREEMPTED_EXIT
            val = self.evaluate()
            self.epoch += 1
            self.results.append({"epoch": self.epoch, **train, **val})
            self.log(f"epoch {self.epoch}/{cfg.epochs} loss {train['train_loss']:.4f} "
                     f"top1 {val['top1']:.2f} top5 {val['top5']:.2f} img/s {train['img_per_s']:.1f}")
            self.writer.scalars({"linear/train_loss": train["train_loss"], "linear/val_top1": val["top1"],
                                 "linear/val_top5": val["top5"], "linear/img_per_s": train["img_per_s"]},
                                self.epoch)
            self.save()
            self.write_results()
        self.writer.close()
        if self.results:
            final = self.results[-1]
            self.log(f"done: top1 {final['top1']:.2f} top5 {final['top5']:.2f} -> {self.out / RESULTS}")
        return 0

    def train_epoch(self) -> dict | None:
        """One epoch of classifier steps; the mean loss and img/s, or None when stopped by a signal."""
        self.head.train()
        meter, loss_sum, since_log, loss_total = Throughput(), torch.zeros((), device=self.device), 0, 0.0
        step0 = self.epoch * self.steps_per_epoch
        for i, (feats, labels) in enumerate(self._train_batches()):
            lr = lr_at(step0 + i, self.total_steps, 0, self.peak_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(self.head(feats), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach()
            since_log += 1
            meter.add(len(labels) * self.info.world_size)
            if since_log == self.cfg.log_every or i + 1 == self.steps_per_epoch:
                mean, stop = self._read_and_agree(loss_sum / since_log)
                loss_total += mean * since_log
                self.writer.scalars({"linear/loss": mean, "linear/lr": lr}, step0 + i + 1)
                loss_sum.zero_()
                since_log = 0
                if stop:
                    return None
        return {"train_loss": loss_total / max(self.steps_per_epoch, 1), "img_per_s": meter.read(),
                "lr": lr_at(step0 + self.steps_per_epoch, self.total_steps, 0, self.peak_lr)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1/top-5 (%) over the whole validation split (all ranks' shards summed)."""
        # The bare module: DDP's forward would broadcast buffers, a collective, and ranks may hold
        # different numbers of validation batches.
        head = dist.unwrap(self.head).eval()
        counts = torch.zeros(3, device=self.device)  # top-1 hits, top-5 hits, images
        batches = ([self.val_feats] if self.cfg.features == "cached" else
                   ((self.encode(x), y.to(self.device)) for x, y in self.val_loader))
        for feats, labels in batches:
            counts[:2] += topk_correct(head(feats.float()), labels)
            counts[2] += len(labels)
        if tdist.is_initialized():
            tdist.all_reduce(counts)
        top1, top5, n = counts.tolist()  # host sync: once per epoch
        return {"top1": 100.0 * top1 / max(n, 1), "top5": 100.0 * top5 / max(n, 1), "val_images": int(n)}


# ---------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> tuple[str | None, dict]:
    """(config path, overrides): --checkpoint, --data and --init become config values, taken as
    plain strings (a path is never parsed as YAML)."""
    parser = argparse.ArgumentParser(prog="python -m byol_fast.linear_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (config/linear_*.yaml); defaults mirror the paper")
    parser.add_argument("--checkpoint", help="runs/x/last.pt, an exported encoder.pt or a linear-eval checkpoint")
    parser.add_argument("--data", help="dataset root holding train/ and val/")
    parser.add_argument("--init", choices=LINEAR_CHOICES["init"], help="random: the untrained baseline")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest)
    if args.checkpoint is not None:
        overrides["checkpoint"] = args.checkpoint
    if args.init is not None:
        overrides["init"] = args.init
    if args.data is not None:
        overrides.setdefault("data", {})["path"] = args.data
    return args.config, overrides


def main(argv: list[str] | None = None) -> int:
    try:
        config_path, overrides = parse_args(argv)
        cfg = load_config(config_path, overrides, cls=LinearConfig)
        return LinearEval(cfg).fit()
    except (ConfigError, DatasetError, ckpt.CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.teardown()


if __name__ == "__main__":
    sys.exit(main())
