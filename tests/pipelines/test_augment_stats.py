"""Statistics of the DALI augmentations against their probabilities and against the torchvision reference.

Tolerances come from sampling error: a firing rate p over N samples has standard deviation
sqrt(p (1 - p) / N), and we allow 4 of them; distributions are compared with the two-sample
Kolmogorov-Smirnov statistic at a 1e-3 level; means with a 4.5-sigma z-score (12 of them: a family-wise
false alarm rate below 1e-3). All on the CPU, 32-pixel outputs, a few seconds.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from byol_fast.config import DataConfig
from conftest import IDENTITY, READER, save, smooth_texture
from pipelines.pretrain import build_pretrain_pipeline
from pipelines.reference import TwoViewTransform

S = 32
RECIPE = DataConfig(image_size=S)  # the paper's probabilities and strengths


def dali_views(files, data, n, seed=0, device="cpu"):
    """n samples of (view1, view2) from the pipeline on ``device``, numpy float32 (n, S, S, 3) each."""
    pipe = build_pretrain_pipeline(files, data, READER, n, device, 0 if device == "gpu" else None, seed)
    view1, view2 = pipe.run()
    if device == "gpu":
        view1, view2 = view1.as_cpu(), view2.as_cpu()
    return view1.as_array(), view2.as_array()


def reference_views(img: Image.Image, data, n, seed=0):
    """n samples of (view1, view2) from the torchvision reference, numpy float32 (n, S, S, 3) each."""
    torch.manual_seed(seed)
    transform = TwoViewTransform(data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 32-pixel convolutions: threads only contend with DALI's idle workers
    try:
        pairs = [transform(img) for _ in range(n)]
    finally:
        torch.set_num_threads(threads)
    return tuple(torch.stack([p[k] for p in pairs]).permute(0, 2, 3, 1).numpy() for k in (0, 1))


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


def ks_critical(n: int, m: int, alpha: float = 1e-3) -> float:
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    rng = np.random.default_rng(1)
    texture = smooth_texture(rng, S, S)
    ramp = np.broadcast_to(np.linspace(0, 255, S * S).reshape(S, S, 1).round().astype(np.uint8), (S, S, 3)).copy()
    ramp[..., 1] = ramp[..., 1].T
    x, y = np.meshgrid(np.arange(256), np.arange(256))
    coords = np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8)  # red = column, green = row
    photo = smooth_texture(rng, 48, 64)
    return dict(texture=save(root / "texture.png", texture), ramp=ramp, ramp_png=save(root / "ramp.png", ramp),
                coords=coords, coords_png=save(root / "coords.png", coords), photo=photo,
                photo_png=save(root / "photo.png", photo))


# ---------------------------------------------------------------------------- firing rates

N_RATE = 1024


def changed(out: np.ndarray, plain: np.ndarray) -> np.ndarray:
    """(N,) bool: which samples differ from the un-augmented image by more than rounding."""
    return np.abs(out - plain[None]).max(axis=(1, 2, 3)) > 1e-3


def grey(out: np.ndarray) -> np.ndarray:
    """(N,) bool: samples whose three channels are equal (after undoing the per-channel normalisation)."""
    mean, std = np.array(RECIPE.mean), np.array(RECIPE.std)
    pixels = out * std + mean
    return np.abs(pixels - pixels.mean(axis=-1, keepdims=True)).max(axis=(1, 2, 3)) < 1e-4


@pytest.mark.parametrize("op", ["flip", "jitter", "grayscale", "blur", "solarize"])
def test_each_op_fires_at_its_recipe_rate_in_each_view(pictures, op):
    """Only `op` enabled, with the recipe's probability for that view; count the samples it changed."""
    p_key = {"flip": "flip_p", "jitter": "jitter_p", "grayscale": "grayscale_p", "blur": "blur_p",
             "solarize": "solarize_p"}[op]
    extra = {"blur": dict(blur_sigma=(1.0, 2.0))}.get(op, {})  # sigma ~0.1 blurs less than a rounding step
    views = [dataclasses.replace(IDENTITY, **{p_key: getattr(v, p_key)}, **extra) for v in (RECIPE.view1, RECIPE.view2)]
    data = dataclasses.replace(RECIPE, view1=views[0], view2=views[1])
    image = pictures["ramp_png"] if op in ("flip", "solarize") else pictures["texture"]
    outs = dali_views([image], data, N_RATE, seed=11)
    plain = dali_views([image], dataclasses.replace(RECIPE, view1=IDENTITY, view2=IDENTITY), 1)[0][0]
    for out, view in zip(outs, views):
        p = getattr(view, p_key)
        fired = grey(out) if op == "grayscale" else changed(out, plain)
        if op == "flip":
            assert np.allclose(out[fired], plain[None, :, ::-1], atol=1e-5)  # what changed is the mirror image
        tolerance = 4 * math.sqrt(p * (1 - p) / N_RATE)
        assert abs(fired.mean() - p) <= tolerance, f"{op}: fired {fired.mean():.3f}, recipe p = {p}"


# ---------------------------------------------------------------------------- crop geometry

N_CROP = 1024


def crop_boxes(views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Views of the coordinate image -> (area fraction, aspect w/h) of each crop, estimated from the ramps.

    Output pixel centres i + 0.5 sample source x0 + (i + 0.5) w / S - 0.5, so the red ramp rises by
    (S - 1) w / S across the view; the same for green and h.
    """
    px = (views * np.array(RECIPE.std) + np.array(RECIPE.mean)) * 255.0
    w = (px[:, :, -1, 0].mean(1) - px[:, :, 0, 0].mean(1)) * S / (S - 1)
    h = (px[:, -1, :, 1].mean(1) - px[:, 0, :, 1].mean(1)) * S / (S - 1)
    return w * h / 256.0**2, w / h


def test_crop_area_and_aspect_follow_the_torchvision_reference(pictures):
    data = dataclasses.replace(RECIPE, view1=IDENTITY, view2=IDENTITY)
    geometry = dict(crop_area=RECIPE.view1.crop_area, crop_aspect=RECIPE.view1.crop_aspect)
    data = dataclasses.replace(data, view1=dataclasses.replace(IDENTITY, **geometry),
                               view2=dataclasses.replace(IDENTITY, **geometry))
    dali_area, dali_aspect = crop_boxes(np.concatenate(dali_views([pictures["coords_png"]], data, N_CROP // 2, seed=5)))
    ref = reference_views(Image.fromarray(pictures["coords"]), data, N_CROP // 2, seed=5)
    ref_area, ref_aspect = crop_boxes(np.concatenate(ref))
    assert 0.06 < dali_area.min() and dali_area.max() < 1.02
    critical = ks_critical(N_CROP, N_CROP)
    assert ks_statistic(dali_area, ref_area) < critical
    assert ks_statistic(np.log(dali_aspect), np.log(ref_aspect)) < critical
    # And against the recipe itself: an area uniform on [0.08, 1] has mean 0.54; torchvision and DALI
    # both redraw boxes that do not fit, which lowers it a little, never below 0.45 on a square image.
    assert 0.45 < dali_area.mean() < 0.56


# ---------------------------------------------------------------------------- colour statistics

N_COLOUR = 768


def colour_summary(views: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) -> (N, 6): each sample's per-channel mean and standard deviation."""
    return np.concatenate([views.mean(axis=(1, 2)), views.std(axis=(1, 2))], axis=1)


def test_colour_statistics_match_the_torchvision_reference(pictures):
    """The full recipe on one photo-like image: per-sample channel means and spreads, DALI vs torchvision."""
    dali = dali_views([pictures["photo_png"]], RECIPE, N_COLOUR, seed=9)
    ref = reference_views(Image.fromarray(pictures["photo"]), RECIPE, N_COLOUR, seed=9)
    for view, d, r in zip(("view1", "view2"), dali, ref):
        a, b = colour_summary(d), colour_summary(r)
        z = (a.mean(0) - b.mean(0)) / np.sqrt(a.var(0) / len(a) + b.var(0) / len(b))
        print(view, np.round(z, 2))
        assert np.abs(z).max() < 4.5, f"{view}: z-scores {np.round(z, 2)} (mean, mean, mean, std, std, std)"


# ---------------------------------------------------------------------------- the same graph on the GPU


@pytest.mark.gpu
def test_gpu_graph_has_the_statistics_of_the_cpu_graph(pictures):
    """device="gpu" (nvJPEG + GPU ops) against device="cpu", the full recipe: per-sample colour
    summaries (z-scores, as above) and the grayscale rate of each view (4 sigma)."""
    cpu = dali_views([pictures["photo_png"]], RECIPE, N_COLOUR, seed=9)
    gpu = dali_views([pictures["photo_png"]], RECIPE, N_COLOUR, seed=9, device="gpu")
    for view, c, g in zip(("view1", "view2"), cpu, gpu):
        a, b = colour_summary(c), colour_summary(g)
        z = (a.mean(0) - b.mean(0)) / np.sqrt(a.var(0) / len(a) + b.var(0) / len(b))
        assert np.abs(z).max() < 4.5, f"{view}: z-scores {np.round(z, 2)} (mean, mean, mean, std, std, std)"
        p = RECIPE.view1.grayscale_p
        assert abs(grey(g).mean() - grey(c).mean()) <= 4 * math.sqrt(2 * p * (1 - p) / N_COLOUR)
