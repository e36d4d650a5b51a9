"""Linear evaluation's step (:class:`byol_fast.evaluation.classifier.LinearClassifier`: frozen
encoder forward, linear layer forward/backward, SGD), alone on synthetic device tensors (``linear``)
and fed by linear evaluation's training loader (``e2e-linear``, DALI: random resized crop + flip)."""
from __future__ import annotations

import dataclasses

import torch

from byol_fast.config import LinearConfig, LinearDataConfig
from byol_fast.datasets.loaders import eval_loader
from byol_fast.evaluation.classifier import LinearClassifier
from byol_fast.models.resnet import build_encoder
from byol_fast.optim.schedules import scaled_lr
from byol_fast.runtime.device import resolve_precision, to_device
from byol_fast.runtime.dist import DistInfo

from ..timing import measure, measure_fed
from .byol_step import synthetic_views
from .context import StageContext
from .loaders import reader_for


def new_classifier(cfg, device, num_classes: int) -> tuple[LinearClassifier, float]:
    """Linear evaluation's classifier on a fresh encoder of the config's backbone, and linear
    evaluation's peak learning rate for this batch (the cost does not depend on it)."""
    torch.manual_seed(cfg.seed)
    encoder, width = build_encoder(cfg.model.backbone)
    clf = LinearClassifier(encoder, width, num_classes, device, DistInfo(), resolve_precision(cfg.precision, device),
                           cfg.channels_last)
    return clf, scaled_lr(LinearConfig.lr, cfg.optim.batch_size)


def run_linear(ctx: StageContext) -> dict:
    """The classifier's step on synthetic images and labels of 1000 classes."""
    cfg, device = ctx.cfg, ctx.device
    clf, lr = new_classifier(cfg, device, 1000)
    images, _ = synthetic_views(cfg, device, ctx.batch)
    images = to_device(images, device, clf.memory_format == torch.channels_last)  # once, not in every step
    labels = torch.randint(0, 1000, (ctx.batch,), device=device)
    return measure(lambda: clf.step(clf.encode(images), labels, lr), ctx.batch, ctx.sync, ctx.plan, ctx.name)


def run_e2e_linear(ctx: StageContext) -> dict:
    """Linear evaluation's training loader (byol_fast.datasets.loaders.eval_loader, DALI: random
    resized crop + flip), with the config's reader section, -> the classifier's step."""
    cfg, device, index = ctx.cfg, ctx.device, ctx.shared.index
    if not index.labelled:  # a flat folder: labels do not change the cost
        index = dataclasses.replace(index, labels=[0] * len(index.files), classes=["all"])
    clf, lr = new_classifier(cfg, device, index.num_classes)
    loader = eval_loader(index, True, LinearDataConfig(image_size=cfg.data.image_size), reader_for("dali", cfg),
                         ctx.batch, DistInfo(), device, cfg.seed)
    channels_last = clf.memory_format == torch.channels_last
    return measure_fed(loader, lambda b: (to_device(b[0], device, channels_last), b[1].to(device, non_blocking=True)),
                       lambda b: clf.step(clf.encode(b[0]), b[1], lr), ctx.batch, device, ctx.plan, ctx.name)
