"""How alike the positions of one image's last feature map are (mean cosine between the positions of
one image, and between all positions of 32 images), for the backbone's map and, where the run has one,
its pixel projection: a pixel head that maps every position to nearly the same vector has collapsed.

Usage, from the repository root: python benchmarks/results/2026-12-03_cpu_dense_more/feature_maps.py RUN...
(RUN: a folder under runs/ holding last.pt; 32 images of data/demo_seg/val at 96 px).
"""
import glob
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from byol_fast.weights import checkpoint
from byol_fast.config import load_config
from byol_fast.models.byol import BYOL


def mean_cosines(vectors: torch.Tensor) -> tuple[float, float]:
    """(within one image, across all) mean cosine of (N, P, C) unit vectors."""
    flat = vectors.reshape(-1, vectors.shape[-1])
    return (vectors @ vectors.transpose(1, 2)).mean().item(), (flat @ flat.T).mean().item()


files = sorted(glob.glob("data/demo_seg/val/images/*.png"))[:32]
mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
pixels = [np.asarray(Image.open(f).convert("RGB").resize((96, 96), Image.Resampling.BILINEAR)) for f in files]
x = (torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255 - mean) / std
for run in sys.argv[1:]:
    state = checkpoint.load(f"runs/{run}/last.pt")
    cfg = load_config(overrides=state["config"])
    model = BYOL(cfg.model)
    model.online.load_state_dict(state["online"])
    model.eval()
    with torch.no_grad():
        _, fmap = model.online.maps(x)
        unit = F.normalize(fmap, dim=1).flatten(2).transpose(1, 2)  # (N, H*W, C)
        within, across = mean_cosines(unit)
        line = f"{run}: map {tuple(fmap.shape[1:])} mean cos within image {within:.3f}, all pairs {across:.3f}"
        if hasattr(model.online, "pixel_projector"):
            proj = F.normalize(model.online.pixel_projector(fmap), dim=1).flatten(2).transpose(1, 2)
            within, across = mean_cosines(proj)
            line += f"; pixel proj cos within {within:.3f} all {across:.3f}"
    print(line)
