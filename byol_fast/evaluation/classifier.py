"""The classifiers of an evaluation run: frozen encoder -> features -> one linear layer -> SGD.

:class:`LinearClassifier` is linear evaluation's, used by ``byol_fast.evaluation.run`` and by the
benchmark's linear stage, so that both run the same code; :class:`FineTuner` trains the whole network
(fine-tuning), :class:`FeatureLoader` serves cached features (``features=cached``) and
:class:`ImageClassifier` classifies images with a saved checkpoint (``byol_fast.predict``).
The linear classifier:

- the encoder is frozen: eval mode (batch norm uses its running statistics), no gradients, run under
  autocast in the run's precision; its features are cast to fp32;
- the head is ``Linear(width, classes)``, N(0, 0.01) weights and zero bias (MoCo/DINO), optionally after
  a ``BatchNorm1d`` without affine parameters (a fixed standardisation at test time, still linear);
- SGD with Nesterov momentum, the learning rate set per step by the caller (cosine, no warm-up).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from byol_fast.config import FinetuneConfig, LinearConfig, load_config
from byol_fast.errors import CheckpointError, ConfigError
from byol_fast.models.feature_extractor import freeze
from byol_fast.runtime import dist
from byol_fast.runtime.device import to_device
from byol_fast.weights import checkpoint as ckpt
from byol_fast.weights.encoder_file import build_frozen_encoder, encoder_weights
from pipelines.contract import EpochLoader, Shard
from pipelines.reference import eval_transform


def make_head(width: int, num_classes: int, head_bn: bool) -> nn.Module:
    linear = nn.Linear(width, num_classes)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(width, affine=False), linear) if head_bn else nn.Sequential(linear)


class LinearClassifier:
    """A frozen ``encoder`` (pooled features of ``width``) and a trained linear head on ``device``;
    the head is wrapped in DDP across processes, so every rank holds the same classifier."""

    def __init__(self, encoder: nn.Module, width: int, num_classes: int, device: torch.device, info: dist.DistInfo,
                 amp_dtype: torch.dtype, channels_last: bool = True, head_bn: bool = False, momentum: float = 0.9,
                 weight_decay: float = 0.0):
        self.device, self.amp_dtype = device, amp_dtype
        on_cuda = device.type == "cuda" and channels_last
        self.memory_format = torch.channels_last if on_cuda else torch.contiguous_format
        params = self._build(encoder, make_head(width, num_classes, head_bn), info)
        self.optimizer = torch.optim.SGD(params, lr=0.0, momentum=momentum, nesterov=True, weight_decay=weight_decay)

    def _build(self, encoder: nn.Module, head: nn.Module, info: dist.DistInfo):
        """Place the networks; return the parameters SGD trains (the head's only)."""
        self.encoder = freeze(encoder).to(self.device, memory_format=self.memory_format)
        self.head = dist.wrap(head, self.device, info, sync_bn=True, channels_last=False)
        return self.head.parameters()

    def train_input(self, images: torch.Tensor) -> torch.Tensor:
        """What :meth:`step` trains on: the frozen encoder's features of the images."""
        return self.encode(images)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) -> features (B, width) float32 (the classifier runs in fp32)."""
        images = to_device(images, self.device, self.memory_format == torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
            return self.encoder(images).float()

    def step(self, features: torch.Tensor, labels: torch.Tensor, lr: float) -> torch.Tensor:
        """One SGD step of the head on (features (B, F), labels (B,)); the loss as a device tensor."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.head.train()
        loss = F.cross_entropy(self.head(features), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores (B, classes) of the head in eval mode. The bare module: DDP's forward would
        broadcast buffers, a collective, and ranks may hold different numbers of validation batches."""
        return dist.unwrap(self.head).eval()(features.float())


class FineTuner(LinearClassifier):
    """The whole network trained: encoder (train mode, batch statistics) and head, one module under
    SyncBN and DDP, one SGD (Nesterov) over every parameter, autocast in the run's precision (with a
    GradScaler for fp16). :meth:`encode` and :meth:`scores` evaluate it (eval mode), as for the
    linear classifier."""

    def _build(self, encoder: nn.Module, head: nn.Module, info: dist.DistInfo):
        encoder.requires_grad_(True)
        self.net = nn.Sequential(encoder, head)
        self.model = dist.wrap(self.net, self.device, info, sync_bn=True,
                               channels_last=self.memory_format == torch.channels_last)
        self.encoder, self.head = self.net[0], self.net[1]  # SyncBN conversion keeps these modules
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        return self.net.parameters()

    def train_input(self, images: torch.Tensor) -> torch.Tensor:
        return to_device(images, self.device, self.memory_format == torch.channels_last)

    def step(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
            logits = self.model(images)
        loss = F.cross_entropy(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.encoder.eval()
        return super().encode(images)


class FeatureLoader(EpochLoader):
    """Precomputed features under the loader contract (``features=cached``): batches (features (B, F),
    labels (B,)) of this rank's share of every epoch, taken from all N rows held on every rank."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, shard: Shard, seed: int):
        super().__init__(len(labels), batch_size, shard, seed, train=True)
        self.features, self.labels = features, labels

    def _batches(self, epoch: int, step: int):
        order = torch.tensor(self.files_of(epoch), device=self.labels.device)
        for k in range(step, self.steps_per_epoch):
            idx = order[k * self.batch_size:(k + 1) * self.batch_size]
            yield self.features[idx], self.labels[idx]


class ImageClassifier:
    """A linear-evaluation or fine-tuning checkpoint (``runs/x/linear/last.pt``) as a classifier of images.

    Images go through the validation preprocessing of that evaluation (resize the shorter side,
    center crop, the encoder's normalisation: ``pipelines.reference.eval_transform``), then the frozen
    encoder and the linear head; scores are softmax probabilities over the checkpoint's classes.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, classes: list[str], data, device="cpu"):
        self.device = torch.device(device)
        self.encoder, self.head = freeze(encoder).to(self.device), head.eval().to(self.device)
        self.classes, self.transform = list(classes), eval_transform(data, train=False)

    @classmethod
    def from_checkpoint(cls, path, device="cpu") -> "ImageClassifier":
        state = ckpt.load(path, ckpt.LINEAR)
        schema = FinetuneConfig if state.get("source", {}).get("finetune") else LinearConfig
        try:
            cfg = load_config(None, state["config"], cls=schema)
        except ConfigError as e:
            raise CheckpointError(f"{path}: its config: {e}") from None
        weights = encoder_weights(state, path)
        encoder, width = build_frozen_encoder(weights, path)
        head = make_head(width, len(state["classes"]), cfg.head_bn)
        try:
            head.load_state_dict(state["head"])
        except (RuntimeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: its classifier head does not fit a {width}-wide encoder and "
                                  f"{len(state['classes'])} classes: {str(e).splitlines()[0][:200]}") from None
        data = dataclasses.replace(cfg.data, mean=weights.mean, std=weights.std)
        return cls(encoder, head, state["classes"], data, device)

    @torch.no_grad()
    def predict(self, images, topk: int = 5) -> list[dict]:
        """PIL images (or paths) -> per image {"pred_label", "pred_class", "pred_score", "topk":
        [(class, score), ...]}, best first (mmpretrain's inference_model gives the same three)."""
        from PIL import Image

        batch = []
        for image in images:
            if not isinstance(image, Image.Image):
                with Image.open(image) as f:
                    image = f.convert("RGB")
            batch.append(self.transform(image.convert("RGB")))
        probs = self.head(self.encoder(torch.stack(batch).to(self.device)).float()).softmax(dim=1).cpu()
        top = probs.topk(min(topk, len(self.classes)), dim=1)
        return [{"pred_label": int(i[0]), "pred_class": self.classes[i[0]], "pred_score": float(p[0]),
                 "topk": [(self.classes[j], float(q)) for j, q in zip(i.tolist(), p.tolist())]}
                for p, i in zip(top.values, top.indices)]
