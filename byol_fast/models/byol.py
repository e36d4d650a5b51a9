"""The BYOL network: online and target towers (encoder -> projector), the online predictor, and the
loss of the two views (symmetric, as in the paper); PixPro's pixel heads when the config asks for them."""
from __future__ import annotations

import copy

import torch
from torch import nn

from byol_fast.config import ModelConfig
from byol_fast.models.loss import byol_loss
from byol_fast.models.pixpro import PixelProjector, PixelPropagation, correspondence, pixpro_loss
from byol_fast.models.resnet import build_encoder, feature_map


class MLP(nn.Sequential):
    """Linear -> BatchNorm1d -> ReLU -> Linear (no bias on the last layer, as in DeepMind's code)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim, bias=False),
        )


class Tower(nn.Module):
    """Encoder followed by projector: what both the online and the target network are made of; with
    PixPro (``pixels``) also a pixel projector on the encoder's last feature map."""

    def __init__(self, cfg: ModelConfig, pixels: bool = False):
        super().__init__()
        self.encoder, self.width = build_encoder(cfg.backbone)
        self.projector = MLP(self.width, cfg.projector_hidden, cfg.projector_out)
        if pixels:
            self.pixel_projector = PixelProjector(self.width, cfg.pixel_hidden, cfg.pixel_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled features (N, width), the feature map (N, width, h, w)) from one pass."""
        fmap = feature_map(self.encoder, x)
        return torch.flatten(self.encoder.avgpool(fmap), 1), fmap


class BYOL(nn.Module):
    """Online tower + predictor trained by gradient; target tower updated by EMA only.

    ``forward(view1, view2)`` runs each view through its own forward pass (batch-norm
    statistics per view, never a concatenation that would mix them) and returns the summed
    symmetric loss, so that one DDP-wrapped call covers the whole step.
    The target runs in training mode (batch statistics) without gradients. Its parameters,
    batch-norm gamma and beta included, follow the online ones by EMA (:meth:`update_target`);
    its running statistics are its own, updated by its own forward passes, and unused for
    training (evaluation uses the online encoder).

    ``cfg.loss`` picks the loss: ``instance`` (BYOL's), ``pixpro`` (PixPro's on pixels:
    byol_fast/models/pixpro.py; the towers gain a pixel projector, the online side a pixel propagation
    module, and ``forward`` takes each view's crop window and flip, (N, 5), to pair pixels by) or
    ``instance+pixpro`` (``instance_weight`` x one + ``pixpro_weight`` x the other).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.instance, self.pixels = cfg.loss in ("instance", "instance+pixpro"), "pixpro" in cfg.loss
        self.online = Tower(cfg, self.pixels)
        self.predictor = MLP(cfg.projector_out, cfg.predictor_hidden, cfg.projector_out)
        if self.pixels:
            self.propagation = PixelPropagation(cfg.pixel_out, cfg.pixpro_gamma)
        self.target = copy.deepcopy(self.online)
        self.target.requires_grad_(False)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, windows1: torch.Tensor | None = None,
                windows2: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.pixels and (windows1 is None or windows2 is None):
            raise ValueError("model.loss with pixpro needs each view's crop window (the loader's windows=True)")
        # Each view through each tower once: pooled features, and with PixPro the feature map too.
        (h1, m1), (h2, m2) = self._encode(self.online, view1), self._encode(self.online, view2)
        z_online1, z_online2 = self.online.projector(h1), self.online.projector(h2)
        q1, q2 = self.predictor(z_online1), self.predictor(z_online2)
        with torch.no_grad():
            (g1, t_m1), (g2, t_m2) = self._encode(self.target, view1), self._encode(self.target, view2)
            z_target1, z_target2 = self.target.projector(g1), self.target.projector(g2)
        out = {"projection": z_online1.detach(), "representation": h1.detach(), "prediction": q1.detach(),
               "target_projection": z_target2}
        if not self.pixels:
            return {"loss": byol_loss(q1, q2, z_target1, z_target2), **out}
        y1 = self.propagation(self.online.pixel_projector(m1))
        y2 = self.propagation(self.online.pixel_projector(m2))
        with torch.no_grad():
            t1, t2 = self.target.pixel_projector(t_m1), self.target.pixel_projector(t_m2)
            positive = correspondence(windows1[:, :4], windows1[:, 4] > 0.5, windows2[:, :4], windows2[:, 4] > 0.5,
                                      m1.shape[2], m1.shape[3], self.cfg.pixpro_threshold)
        pixel = pixpro_loss(y1, y2, t1, t2, positive)
        if self.instance:
            loss = self.cfg.pixpro_weight * pixel + self.cfg.instance_weight * byol_loss(q1, q2, z_target1, z_target2)
        else:  # the predictor stays in the graph, with no effect (DDP wants every parameter used)
            loss = self.cfg.pixpro_weight * pixel + 0.0 * (q1.sum() + q2.sum())
        return {"loss": loss, **out, "pixpro_loss": pixel.detach(), "pixel_projection": t1,
                "positive_pairs": positive.float().sum(dim=(1, 2)).mean()}

    def _encode(self, tower: Tower, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pooled features, the last feature map when PixPro needs it, else None)."""
        return tower.maps(x) if self.pixels else (tower.encoder(x), None)

    @torch.no_grad()
    def update_target(self, tau: float | torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """target <- tau * target + (1 - tau) * online, over parameters only, in a few fused kernels.

        ``tau`` may be a 0-dim device tensor (a compiled step reads it as an input, never as a
        constant); with ``ok`` (0-dim bool) a step that was not applied leaves the target exactly as
        it was (weight 0: ``t + 0 * (o - t)``), decided on the device.
        """
        weight = 1.0 - tau
        if ok is not None:
            weight = torch.where(ok, weight, 0.0)
        torch._foreach_lerp_(list(self.target.parameters()), list(self.online.parameters()), weight)
