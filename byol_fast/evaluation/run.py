"""A classifier trained on a pretrained encoder: linear evaluation and semi-supervised fine-tuning.

The run behind ``python -m byol_fast.linear_eval`` (a :class:`~byol_fast.config.LinearConfig`: the
encoder frozen, one linear layer trained on its features; the protocol behind the published top-1)
and ``python -m byol_fast.finetune`` (a :class:`~byol_fast.config.FinetuneConfig`: the whole network
trained on a class-balanced fraction of the labels, the paper's semi-supervised protocol). Both read
their checkpoint the same way, report top-1/top-5 on the validation split after every epoch, write
``results.json`` and TensorBoard, checkpoint every epoch (``last.pt``, a classifier checkpoint that
``byol_fast.predict`` and the feature API read) and resume from their folder by themselves.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from byol_fast.config import FinetuneConfig, LinearConfig, load_config, parse_overrides, to_dict, to_yaml, validate
from byol_fast.datasets import object_store as store
from byol_fast.datasets.loaders import eval_loader, shard_of
from byol_fast.datasets.open_dataset import checked_dataset
from byol_fast.errors import ConfigError
from byol_fast.evaluation.accuracy import topk_correct
from byol_fast.evaluation.classifier import FeatureLoader, FineTuner, LinearClassifier
from byol_fast.evaluation.features import loader_features
from byol_fast.models.feature_extractor import freeze
from byol_fast.models.resnet import build_encoder
from byol_fast.optim.schedules import lr_at, scaled_lr
from byol_fast.runtime import dist, out_dir
from byol_fast.runtime.cli import run_cli
from byol_fast.runtime.device import per_process_batch, resolve_precision
from byol_fast.runtime.process import NEVER, PREEMPTED_EXIT, Process, SaveSchedule, git_revision
from byol_fast.runtime.progress import Throughput
from byol_fast.runtime.tensorboard import Writer
from byol_fast.weights import checkpoint as ckpt
from byol_fast.weights.checkpoint_schema import require
from byol_fast.weights.encoder_file import EncoderWeights, build_frozen_encoder, read_encoder_weights

RESULTS = "results.json"
# The recipe in a run's source, so that a sweep sharing one out_dir never resumes another learning
# rate, batch size or seed; a checkpoint whose source lacks these keys (written before they were
# recorded) still resumes.
# Epochs stay out: a finished run may be extended (--epochs=N+k resumes after epoch N).
RECIPE_KEYS = ("seed", "lr", "batch_size")


def same_source(stored, source: dict) -> bool:
    """Whether a checkpoint's stored source is this run's (an older file without the recipe keys too)."""
    return isinstance(stored, dict) and stored == {k: v for k, v in source.items() if k in stored or k not in RECIPE_KEYS}


def output_dir(cfg: LinearConfig) -> Path:
    """``out_dir``, or beside the checkpoint ``linear/`` (``linear_random/`` for init=random), or for
    fine-tuning ``finetune_10pct/`` (``finetune_10pct_random/``; ``finetune_subset`` for a list file);
    a run validated on held-out training images adds its learning rate and epochs
    (``finetune_10pct_holdout_lr0.02_30ep/``), so that the runs of a sweep keep apart."""
    if cfg.out_dir:
        return Path(cfg.out_dir)
    name = "linear"
    if isinstance(cfg, FinetuneConfig):
        name = "finetune_subset" if cfg.subset else f"finetune_{100 * cfg.label_fraction:g}pct"
    name += "" if cfg.init == "checkpoint" else "_random"
    name += f"_holdout_lr{cfg.lr:g}_{cfg.epochs}ep" if cfg.holdout else ""
    return Path(cfg.checkpoint).parent / name


def split_index(root: str | Path, split: str, info: dist.DistInfo, workers: int = 0):
    """The checked index (byol_fast.datasets.index) or shard set (byol_fast.datasets.shard_set) of
    ``root/split``, built or checked by rank 0 only; it must be labelled."""
    path = store.join(root, split)
    index = checked_dataset(path, info, workers)
    if not index.labelled:
        raise ConfigError(f"data.path: {path} has no class folders; a classifier needs labels")
    return index


def make_encoder(cfg: LinearConfig) -> tuple[torch.nn.Module, int, str, EncoderWeights | None]:
    """(frozen encoder, width, backbone name, the file's weights or None): the checkpoint's encoder
    or, for init=random, a seeded fresh one of its (or ``backbone``'s) architecture."""
    weights = read_encoder_weights(cfg.checkpoint, cfg.which, cfg.backbone or None) if cfg.checkpoint else None
    if cfg.init == "checkpoint":
        encoder, width = build_frozen_encoder(weights, cfg.checkpoint)
        return encoder, width, weights.backbone, weights
    name = cfg.backbone or weights.backbone
    torch.manual_seed(cfg.seed)  # the same random encoder on every rank and every resume
    encoder, width = build_encoder(name)
    return freeze(encoder), width, name, weights


class ClassifierRun:
    """One process of a linear evaluation or a fine-tuning: encoder, classifier, loaders; :meth:`fit` is the loop."""

    def __init__(self, cfg: LinearConfig):
        validate(cfg)
        self.cfg = cfg
        torch.manual_seed(cfg.seed)  # the classifier's initialisation (DDP then copies rank 0's)
        self.proc = Process(cfg.device)
        self.info, self.device, self.log = self.proc.info, self.proc.device, self.proc.log
        self.out = output_dir(cfg)
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        self.finetune = isinstance(cfg, FinetuneConfig)
        self.what = "fine-tuning" if self.finetune else "linear evaluation"
        self.log(f"{self.proc.banner(self.what)}\nresolved config:\n{to_yaml(cfg)}")

        encoder, self.width, self.backbone, weights = make_encoder(cfg)
        self.padding = weights.padding if weights is not None and cfg.init == "checkpoint" else "torchvision"
        # The data section with the encoder's own normalisation (from its checkpoint).
        self.data = cfg.data if weights is None else \
            dataclasses.replace(cfg.data, mean=tuple(weights.mean), std=tuple(weights.std))
        self.train_index, self.val_index = self._splits()
        self.num_classes = self.train_index.num_classes
        self.batch = per_process_batch(cfg.batch_size, self.info.world_size)
        if len(self.train_index) < cfg.batch_size:
            raise ConfigError(f"batch_size: {cfg.batch_size} is more than the {len(self.train_index)} training images")
        kind = FineTuner if self.finetune else LinearClassifier
        self.classifier = kind(encoder, self.width, self.num_classes, self.device, self.info, self.amp_dtype,
                               cfg.channels_last, cfg.head_bn, cfg.momentum, cfg.weight_decay)
        self._build_data()
        self.steps_per_epoch = self.train_loader.steps_per_epoch
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.peak_lr = scaled_lr(cfg.lr, cfg.batch_size)
        self.epoch, self.results = 0, []
        if self.info.is_main:
            c = self.classifier
            saved = [c.encoder.state_dict(), dist.unwrap(c.head).state_dict()]
            if self.finetune:
                saved.append(list(c.encoder.parameters()))  # SGD's momentum of every trained weight
            out_dir.prepare(self.out)
            out_dir.check_room(self.out, out_dir.state_bytes(*saved))
        self.writer = Writer(str(self.out), self.info.is_main)
        self.schedule = SaveSchedule(NEVER, self.log)  # saves at epoch ends; a stop repeats the epoch
        self.resume()

    # ------------------------------------------------------------------ data

    def _splits(self):
        """(training, validation) samples: for fine-tuning the labelled subset of train/ (a list file, or
        a class-balanced fraction), else all of it; validation all of val/, or with ``holdout`` images
        of train/ set aside (LabelledSamples.held_out)."""
        cfg, workers = self.cfg, self.cfg.reader.index_workers
        index = split_index(self.data.path, "train", self.info, workers)
        labelled = list(range(len(index)))
        if self.finetune and cfg.subset:
            path = Path(cfg.subset)
            if not path.is_file():
                raise ConfigError(f"subset: {path} is not a file")
            labelled = index.named([line.strip() for line in path.read_text().splitlines() if line.strip()],
                                   str(path))
        elif self.finetune:
            labelled = index.labelled_fraction(cfg.label_fraction, cfg.seed)
        train, val = labelled, None
        if cfg.holdout:
            try:
                train, held = index.held_out(labelled, cfg.holdout, cfg.seed)
            except ValueError as e:
                raise ConfigError(f"holdout: {e} ({store.join(self.data.path, 'train')})") from None
            val = index.take(held)
        if self.finetune:
            self.log(f"labelled subset: {len(train)} of {len(index)} training images"
                     + (f" ({len(labelled) - len(train)} of the {len(labelled)} drawn went to the held-out split)"
                        if len(train) < len(labelled) else ""))
        if val is not None:
            self.log(f"validation: {len(val)} images held out of train/ (not val/); training on {len(train)}")
        else:
            val = split_index(self.data.path, "val", self.info, workers)
            if index.classes != val.classes:
                raise ConfigError(f"data.path: train/ and val/ of {self.data.path} have different class folders")
        return index.take(train), val

    def _build_data(self) -> None:
        """Images mode: two image loaders. Cached mode: features of center crops, computed here once."""
        cfg, info = self.cfg, self.info
        loader = lambda index, train: eval_loader(index, train, self.data, cfg.reader, self.batch,  # noqa: E731
                                                  info, self.device, cfg.seed)
        self.val_loader = loader(self.val_index, False)
        if cfg.features == "images":
            self.train_loader = loader(self.train_index, True)
            return
        start = time.perf_counter()
        encoder = self.classifier.encoder
        train_feats = loader_features(encoder, loader(self.train_index, False), self.device, self.amp_dtype)
        self.val_feats = loader_features(encoder, self.val_loader, self.device, self.amp_dtype)
        # Every rank holds every training feature; the loader contract picks each rank's per epoch.
        feats, labels = dist.gather_rows(*train_feats)
        self.train_loader = FeatureLoader(feats, labels, self.batch, shard_of(info), cfg.seed)
        self.log(f"cached features of {len(self.train_index)} train and {len(self.val_index)} val images "
                 f"in {time.perf_counter() - start:.1f} s")

    def _train_batches(self):
        """This epoch's (features (B, F) float32, labels (B,)) batches, on the device."""
        for x, labels in self.train_loader:
            feats = x if self.cfg.features == "cached" else self.classifier.train_input(x)
            yield feats, labels.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ checkpoints

    def source(self) -> dict:
        """What the classifier was trained on; a resumed run must match it."""
        source = {"checkpoint": str(self.cfg.checkpoint), "init": self.cfg.init, "which": self.cfg.which,
                  "backbone": self.backbone, "features": self.cfg.features}
        if self.finetune:
            source.update(finetune=True, label_fraction=self.cfg.label_fraction, subset=self.cfg.subset)
        if self.cfg.holdout:
            source["holdout"] = self.cfg.holdout
        source.update({key: getattr(self.cfg, key) for key in RECIPE_KEYS})
        return source

    def save(self) -> None:
        if not self.info.is_main:
            return
        c = self.classifier
        state = {"encoder": c.encoder.state_dict(), "backbone": self.backbone, "padding": self.padding,
                 "mean": list(self.data.mean),
                 "std": list(self.data.std), "classes": self.train_index.classes,
                 "head": dist.unwrap(c.head).state_dict(), "optimizer": c.optimizer.state_dict(),
                 "epoch": self.epoch, "results": self.results, "source": self.source(), "config": to_dict(self.cfg),
                 "rng": ckpt.rng_state(), "git": git_revision()}
        if self.finetune:
            state["scaler"] = c.scaler.state_dict()
        ckpt.save(state, self.out / ckpt.LAST, ckpt.LINEAR)

    def resume(self) -> None:
        path = self.out / ckpt.LAST
        if not path.exists():
            return
        state = ckpt.load(path)
        if ckpt.kind_of(state) != ckpt.LINEAR or not same_source(state.get("source"), self.source()):
            raise ckpt.CheckpointError(f"{path} holds another evaluation ({state.get('source')}); "
                                       f"this run is {self.source()}: use another out_dir")
        require(state, path, ("optimizer", "rng", "epoch", "results"), "linear-evaluation checkpoint")
        try:  # the stored encoder is the one the classifier was trained on (a random init included)
            self.classifier.encoder.load_state_dict(state["encoder"], strict=True)
            dist.unwrap(self.classifier.head).load_state_dict(state["head"])
            self.classifier.optimizer.load_state_dict(state["optimizer"])
            if self.finetune and "scaler" in state:
                self.classifier.scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{path} does not fit this run: {' '.join(str(e).split())[:300]}") from None
        ckpt.set_rng_state(state["rng"])
        self.epoch, self.results = state["epoch"], state["results"]
        self.train_loader.load_state_dict({"epoch": self.epoch, "step": 0})  # saved at the epoch's end
        self.log(f"resumed from {path} after epoch {self.epoch}")

    def write_results(self) -> None:
        if not self.info.is_main:
            return
        best = max(self.results, key=lambda r: r["top1"])
        doc = {"source": self.source(), "num_classes": self.num_classes, "train_images": len(self.train_index),
               "val_images": len(self.val_index), "final": self.results[-1], "best": best, "epochs": self.results,
               "config": to_dict(self.cfg), "git": git_revision()}
        tmp = self.out / f".{RESULTS}.tmp"
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(self.out / RESULTS)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        cfg = self.cfg
        self.schedule.on_signals("stopping; the interrupted epoch repeats on resume")
        self.log(f"{self.backbone} ({cfg.init}) -> linear {self.width} x {self.num_classes}; "
                 f"{len(self.train_index)} train / {len(self.val_index)} val images; {self.steps_per_epoch} "
                 f"steps/epoch x {cfg.epochs} epochs; batch {cfg.batch_size}; peak lr {self.peak_lr:g}; "
                 f"features {cfg.features}; encoder precision {self.amp_dtype}")
        while self.epoch < cfg.epochs:
            train = self.train_epoch()
            if train is None:
                self.schedule.close()
                return PREEMPTED_EXIT
            val = self.evaluate()
            self.epoch += 1
            self.results.append({"epoch": self.epoch, **train, **val})
            self.log(f"epoch {self.epoch}/{cfg.epochs} loss {train['train_loss']:.4f} "
                     f"top1 {val['top1']:.2f} top5 {val['top5']:.2f} img/s {train['img_per_s']:.1f}")
            tag = "finetune" if self.finetune else "linear"
            self.writer.scalars({f"{tag}/train_loss": train["train_loss"], f"{tag}/val_top1": val["top1"],
                                 f"{tag}/val_top5": val["top5"], f"{tag}/img_per_s": train["img_per_s"]},
                                self.epoch)
            self.save()  # every epoch end: the schedule's answer here is always "save"
            self.write_results()
            if self.schedule.poll(epoch_end=True)[1]:  # a stop asked for during the epoch's last step or validation
                self.schedule.close()
                self.log(f"stopped after epoch {self.epoch}; run the same command to resume")
                return PREEMPTED_EXIT
        self.schedule.close()
        self.writer.close()
        if self.results:
            final = self.results[-1]
            self.log(f"done: top1 {final['top1']:.2f} top5 {final['top5']:.2f} -> {self.out / RESULTS}")
        return 0

    def train_epoch(self) -> dict | None:
        """One epoch of classifier steps; the mean loss and img/s, or None when stopped by a signal."""
        meter, loss_sum, since_log, loss_total = Throughput(), torch.zeros((), device=self.device), 0, 0.0
        step0 = self.epoch * self.steps_per_epoch
        for i, (feats, labels) in enumerate(self._train_batches()):
            lr = lr_at(step0 + i, self.total_steps, 0, self.peak_lr)
            loss_sum += self.classifier.step(feats, labels, lr)
            since_log += 1
            meter.add(len(labels) * self.info.world_size)
            if since_log == self.cfg.log_every or i + 1 == self.steps_per_epoch:
                mean = dist.all_reduce_mean(loss_sum / since_log).item()  # host sync: every log_every steps
                loss_total += mean * since_log
                tag = "finetune" if self.finetune else "linear"
                self.writer.scalars({f"{tag}/loss": mean, f"{tag}/lr": lr}, step0 + i + 1)
                loss_sum.zero_()
                since_log = 0
            if self.schedule.poll()[1]:
                return None
        return {"train_loss": loss_total / max(self.steps_per_epoch, 1), "img_per_s": meter.read(),
                "lr": lr_at(step0 + self.steps_per_epoch, self.total_steps, 0, self.peak_lr)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1/top-5 (%) over the whole validation split (all ranks' shards summed)."""
        counts = torch.zeros(3, device=self.device)  # top-1 hits, top-5 hits, images
        batches = ([self.val_feats] if self.cfg.features == "cached" else
                   ((self.classifier.encode(x), y.to(self.device)) for x, y in self.val_loader))
        for feats, labels in batches:
            counts[:2] += topk_correct(self.classifier.scores(feats), labels)
            counts[2] += len(labels)
        if tdist.is_initialized():
            tdist.all_reduce(counts)
        top1, top5, n = counts.tolist()  # host sync: once per epoch
        return {"top1": 100.0 * top1 / max(n, 1), "top5": 100.0 * top5 / max(n, 1), "val_images": int(n)}


def command_line(prog: str, description: str, argv: list[str] | None) -> tuple[str | None, dict]:
    """(config path, overrides) of a classifier run's command line: --checkpoint, --data and --init
    become config values, taken as plain strings (a path is never parsed as YAML); the rest are
    ``--key=value`` overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (config/*.yaml); defaults mirror the paper")
    parser.add_argument("--checkpoint", help="runs/x/last.pt, an exported encoder.pt, another project's release")
    parser.add_argument("--data", help="dataset root holding train/ and val/")
    parser.add_argument("--init", choices=("checkpoint", "random"), help="random: the untrained baseline")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest)
    if args.checkpoint is not None:
        overrides["checkpoint"] = args.checkpoint
    if args.init is not None:
        overrides["init"] = args.init
    if args.data is not None:
        overrides.setdefault("data", {})["path"] = args.data
    return args.config, overrides


def run_command(prog: str, description: str, argv: list[str] | None, schema: type) -> int:
    """A classifier run from its command line (``schema``: LinearConfig or FinetuneConfig): its exit status."""
    def body() -> int:
        config_path, overrides = command_line(prog, description, argv)
        return ClassifierRun(load_config(config_path, overrides, cls=schema)).fit()

    return run_cli(body)
