"""The crop window and flip each view reports (for PixPro's pixel pairs) agree with the
pixels it outputs: on an image whose red level is its x coordinate and green level its y, each view's
columns and rows must read back the window's coordinates (mirrored when it reports a flip), for the
DALI graph and its torchvision reference alike."""
import dataclasses

import numpy as np
import pytest
import torch
from conftest import IDENTITY, READER, save

from byol_fast.config import DataConfig
from pipelines.contract import Shard
from pipelines.loader import DaliTwoViewLoader
from pipelines.reference import TorchvisionTwoViewLoader

W, H, S = 240, 200, 32
VIEW = dataclasses.replace(IDENTITY, crop_area=(0.1, 0.6), crop_aspect=(3 / 4, 4 / 3), flip_p=0.5)
DATA = DataConfig(image_size=S, interp="linear", view1=VIEW, view2=VIEW)


@pytest.fixture(scope="module")
def ramps(tmp_path_factory):
    """Lossless images whose pixel (x, y) holds red x, green y."""
    x, y = np.meshgrid(np.arange(W), np.arange(H))
    pixels = np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    root = tmp_path_factory.mktemp("ramps")
    return [save(root / f"ramp{i}.png", pixels) for i in range(8)]


def make(kind, files, windows=True):
    if kind == "dali":
        return DaliTwoViewLoader(files, DATA, READER, 4, "cpu", Shard(), 3, torch.device("cpu"), windows=windows)
    return TorchvisionTwoViewLoader(files, DATA, 4, 0, Shard(), 3, windows=windows)


def levels(view: torch.Tensor) -> torch.Tensor:
    """A normalised (3, S, S) view back to [0, 255] levels."""
    mean, std = torch.tensor(DATA.mean).view(3, 1, 1), torch.tensor(DATA.std).view(3, 1, 1)
    return (view * std + mean) * 255.0


@pytest.mark.parametrize("kind", ["dali", "torchvision"])
def test_each_views_pixels_come_from_the_window_it_reports(ramps, kind):
    flips, areas = [], []
    for batch in make(kind, ramps):
        assert len(batch) == 4
        for views, windows in ((batch[0], batch[2]), (batch[1], batch[3])):
            assert windows.shape == (4, 5) and windows.dtype == torch.float32
            for view, (x0, y0, x1, y1, flip) in zip(views, windows.tolist()):
                assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H and flip in (0.0, 1.0)
                areas.append((x1 - x0) * (y1 - y0) / (W * H))
                flips.append(flip)
                px = levels(view)
                centres = (torch.arange(S) + 0.5) / S
                xs = x0 + centres * (x1 - x0) - 0.5  # pixel centres of the view's columns, in the image
                ys = y0 + centres * (y1 - y0) - 0.5
                if flip:
                    xs = xs.flip(0)
                inner = slice(2, S - 2)  # the resize filter reaches past the window at the borders
                red, green = px[0].mean(dim=0), px[1].mean(dim=1)  # per column, per row
                assert torch.allclose(red[inner], xs[inner], atol=1.5), (kind, red[inner] - xs[inner])
                assert torch.allclose(green[inner], ys[inner], atol=1.5), (kind, green[inner] - ys[inner])
    assert 0.0 < sum(flips) < len(flips)  # both flipped and unflipped views were checked
    assert all(0.09 <= a <= 0.61 for a in areas)  # the recipe's area range (whole pixels)


def test_instance_runs_do_not_get_windows(ramps):
    for kind in ("dali", "torchvision"):
        assert len(next(iter(make(kind, ramps, windows=False)))) == 2
