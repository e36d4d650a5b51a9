"""Linear evaluation: a linear classifier trained on the frozen pretrained encoder.

``python -m byol_fast.linear_eval --checkpoint RUN/last.pt --data DATA [--init random] [--config C] [--key=value ...]``

DATA holds ``train/`` and ``val/`` ImageFolder trees with the same class folders. The protocol is the
one behind the published top-1 (byol_fast/REFERENCE.md section 1, BYOL Appendix C.1):

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
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from . import checkpoint as ckpt
from . import dist
from .classifier import FeatureLoader, LinearClassifier
from .config import ConfigError, LinearConfig, load_config, parse_overrides, to_dict, to_yaml, validate
from .features import EncoderWeights, build_frozen_encoder, freeze, loader_features, read_encoder_weights
from .index import checked_index
from .loaders import eval_loader, shard_of
from .metrics import Throughput, Writer
from .model import build_encoder
from .monitors import topk_correct
from .runtime import NEVER, PREEMPTED_EXIT, Process, SaveSchedule, per_process_batch, resolve_precision, run_cli
from .schedules import lr_at, scaled_lr

RESULTS = "results.json"


def output_dir(cfg: LinearConfig) -> Path:
    """``out_dir``, or ``linear/`` (``linear_random/``) beside the checkpoint."""
    if cfg.out_dir:
        return Path(cfg.out_dir)
    return Path(cfg.checkpoint).parent / ("linear" if cfg.init == "checkpoint" else "linear_random")


def split_index(root: str | Path, split: str, info: dist.DistInfo, workers: int = 0):
    """The checked index (byol_fast.index) of ``root/split``, built by rank 0 only; it must be a
    labelled class tree."""
    index = checked_index(Path(root) / split, info, workers)
    if not index.labelled:
        raise ConfigError(f"data.path: {Path(root) / split} has no class folders; linear evaluation needs labels")
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


class LinearEval:
    """One linear-evaluation process: frozen encoder, classifier, loaders; :meth:`fit` is the loop."""

    def __init__(self, cfg: LinearConfig):
        validate(cfg)
        self.cfg = cfg
        torch.manual_seed(cfg.seed)  # the classifier's initialisation (DDP then copies rank 0's)
        self.proc = Process(cfg.device)
        self.info, self.device, self.log = self.proc.info, self.proc.device, self.proc.log
        self.out = output_dir(cfg)
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        self.log(f"{self.proc.banner('linear evaluation')}\nresolved config:\n{to_yaml(cfg)}")

        encoder, self.width, self.backbone, weights = make_encoder(cfg)
        self.padding = weights.padding if weights is not None and cfg.init == "checkpoint" else "torchvision"
        # The data section with the encoder's own normalisation (from its checkpoint).
        self.data = cfg.data if weights is None else \
            dataclasses.replace(cfg.data, mean=tuple(weights.mean), std=tuple(weights.std))
        self.train_index = split_index(self.data.path, "train", self.info, cfg.reader.index_workers)
        self.val_index = split_index(self.data.path, "val", self.info, cfg.reader.index_workers)
        if self.train_index.classes != self.val_index.classes:
            raise ConfigError(f"data.path: train/ and val/ of {self.data.path} have different class folders")
        self.num_classes = self.train_index.num_classes
        self.batch = per_process_batch(cfg.batch_size, self.info.world_size)
        if len(self.train_index) < cfg.batch_size:
            raise ConfigError(f"batch_size: {cfg.batch_size} is more than the {len(self.train_index)} training images")
        self.classifier = LinearClassifier(encoder, self.width, self.num_classes, self.device, self.info,
                                           self.amp_dtype, cfg.channels_last, cfg.head_bn, cfg.momentum,
                                           cfg.weight_decay)
        self._build_data()
        self.steps_per_epoch = self.train_loader.steps_per_epoch
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.peak_lr = scaled_lr(cfg.lr, cfg.batch_size)
        self.epoch, self.results = 0, []
        self.writer = Writer(str(self.out), self.info.is_main)
        self.schedule = SaveSchedule(NEVER, self.log)  # saves at epoch ends; a stop repeats the epoch
        self.resume()

    # ------------------------------------------------------------------ data

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
            feats = x if self.cfg.features == "cached" else self.classifier.encode(x)
            yield feats, labels.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ checkpoints

    def source(self) -> dict:
        """What the classifier was trained on; a resumed run must match it."""
        return {"checkpoint": str(self.cfg.checkpoint), "init": self.cfg.init, "which": self.cfg.which,
                "backbone": self.backbone, "features": self.cfg.features}

    def save(self) -> None:
        if not self.info.is_main:
            return
        c = self.classifier
        state = {"encoder": c.encoder.state_dict(), "backbone": self.backbone, "padding": self.padding,
                 "mean": list(self.data.mean),
                 "std": list(self.data.std), "classes": self.train_index.classes,
                 "head": dist.unwrap(c.head).state_dict(), "optimizer": c.optimizer.state_dict(),
                 "epoch": self.epoch, "results": self.results, "source": self.source(), "config": to_dict(self.cfg),
                 "rng": ckpt.rng_state(), "git": ckpt.git_revision()}
        ckpt.save(state, self.out / ckpt.LAST, ckpt.LINEAR)

    def resume(self) -> None:
        path = self.out / ckpt.LAST
        if not path.exists():
            return
        state = ckpt.load(path)
        if ckpt.kind_of(state) != ckpt.LINEAR or state.get("source") != self.source():
            raise ckpt.CheckpointError(f"{path} holds another evaluation ({state.get('source')}); "
                                       f"this run is {self.source()}: use another out_dir")
        # The stored encoder is the one the classifier was trained on (a random init included).
        self.classifier.encoder.load_state_dict(state["encoder"], strict=True)
        dist.unwrap(self.classifier.head).load_state_dict(state["head"])
        self.classifier.optimizer.load_state_dict(state["optimizer"])
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
               "config": to_dict(self.cfg), "git": ckpt.git_revision()}
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
            self.writer.scalars({"linear/train_loss": train["train_loss"], "linear/val_top1": val["top1"],
                                 "linear/val_top5": val["top5"], "linear/img_per_s": train["img_per_s"]},
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
                self.writer.scalars({"linear/loss": mean, "linear/lr": lr}, step0 + i + 1)
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


# ---------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> tuple[str | None, dict]:
    """(config path, overrides): --checkpoint, --data and --init become config values, taken as
    plain strings (a path is never parsed as YAML)."""
    parser = argparse.ArgumentParser(prog="python -m byol_fast.linear_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (config/linear_*.yaml); defaults mirror the paper")
    parser.add_argument("--checkpoint", help="runs/x/last.pt, an exported encoder.pt or a linear-eval checkpoint")
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


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        config_path, overrides = parse_args(argv)
        return LinearEval(load_config(config_path, overrides, cls=LinearConfig)).fit()

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
