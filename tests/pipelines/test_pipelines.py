"""The DALI pipelines on the CPU: shapes, determinism, sharding, and each op against an independent reference.

Op tests use lossless PNGs of the output size with a full-image crop (area 1, aspect 1), so the crop is
the identity and each op can be compared pixel for pixel with a formula or with torchvision's functional
op on the same uint8 image. One uint8 level is 1 / (255 * std) after normalisation: tolerances are in levels.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from byol_fast.config import DataConfig, LinearDataConfig, ViewConfig
from conftest import IDENTITY, READER, save, smooth_texture
from pipelines import colour, pretrain
from pipelines.contract import Shard, steps_per_epoch
from pipelines.loader import DaliEvalLoader, DaliTwoViewLoader
from pipelines.pretrain import build_pretrain_pipeline

S = 32  # output side of the op tests, and the side of their square PNGs
MEAN = np.array(DataConfig().mean, np.float32)
STD = np.array(DataConfig().std, np.float32)
LEVEL = 1.0 / (255.0 * STD.min())  # one uint8 step, normalised


def data_config(view1=IDENTITY, view2=IDENTITY, **kw) -> DataConfig:
    return DataConfig(**{"image_size": S, "view1": view1, "view2": view2, **kw})


def only(**kw) -> ViewConfig:
    """The identity view with some knobs changed."""
    return dataclasses.replace(IDENTITY, **kw)


def run_views(files, data, batch_size, seed=0):
    """One batch of the CPU pipeline -> (view1, view2) as numpy float32 (N, S, S, 3)."""
    pipe = build_pretrain_pipeline(files, data, READER, batch_size, "cpu", None, seed)
    view1, view2 = pipe.run()
    return view1.as_array(), view2.as_array()


def denormalise(x: np.ndarray) -> np.ndarray:
    """Normalised float HWC -> the uint8-scale pixel values (float) it was made from."""
    return (x * STD + MEAN) * 255.0


def normalise(u8: np.ndarray) -> np.ndarray:
    return (u8.astype(np.float32) / 255.0 - MEAN) / STD


def chw(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(u8)).permute(2, 0, 1)


def hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    jpegs = [save(root / f"photo{i:02d}.jpg", smooth_texture(rng, 48, 64)) for i in range(16)]
    texture = smooth_texture(rng, S, S)
    ramp = np.broadcast_to(np.linspace(0, 255, S * S).reshape(S, S, 1).round().astype(np.uint8), (S, S, 3)).copy()
    ramp[..., 1] = ramp[..., 1].T  # channels differ, so channel mix-ups show
    greys = [save(root / f"grey{i:02d}.png", np.full((S, S, 3), 8 + 15 * i, np.uint8)) for i in range(16)]
    return dict(jpegs=jpegs, texture=texture, texture_png=save(root / "texture.png", texture), ramp=ramp,
                ramp_png=save(root / "ramp.png", ramp), greys=greys)


# ---------------------------------------------------------------------------- loader


def test_loader_shapes_layout_and_epochs(images):
    data = DataConfig(image_size=S)  # the paper's recipe
    loader = DaliTwoViewLoader(images["jpegs"], data, READER, 4, "cpu", Shard(), 0, torch.device("cpu"))
    assert loader.steps_per_epoch == len(loader) == 4
    for epoch in range(2):
        batches = list(loader)
        assert len(batches) == 4
        for view1, view2 in batches:
            for v in (view1, view2):
                assert v.shape == (4, 3, S, S) and v.dtype == torch.float32
                assert v.is_contiguous(memory_format=torch.channels_last)  # NHWC memory, as documented
                assert torch.isfinite(v).all()
            assert not torch.equal(view1, view2)  # two independent crops + augmentations


def test_steps_per_epoch_is_the_same_on_every_rank_and_rejects_too_few_files():
    assert steps_per_epoch(1000, 32, 3) == 10  # 1000 // 96, whatever a rank's shard size
    with pytest.raises(ValueError, match=r"10 files .* 4 images per rank x 3 ranks"):
        steps_per_epoch(10, 4, 3)


def test_same_seed_same_batches_other_seed_other_batches(images):
    data = DataConfig(image_size=S)
    a = run_views(images["jpegs"], data, 8, seed=3)
    b = run_views(images["jpegs"], data, 8, seed=3)
    c = run_views(images["jpegs"], data, 8, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def file_ids(batch: np.ndarray) -> list[int]:
    """Which grey image (8 + 15 i) each sample of an identity-augmented batch is."""
    grey = denormalise(batch).mean(axis=(1, 2, 3))
    return [int(round((g - 8) / 15)) for g in grey]


def test_probe_labels_stay_with_their_files(images):
    """Labels (for the online probe) follow their files through the shuffled, cut epoch order."""
    loader = DaliTwoViewLoader(images["greys"], data_config(), READER, 3, "cpu", Shard(), 5, torch.device("cpu"),
                               labels=list(range(16)))
    for _ in range(2):
        for view1, view2, labels in loader:
            assert labels.dtype == torch.int64
            assert file_ids(view1.permute(0, 2, 3, 1).numpy()) == labels.tolist()
            assert file_ids(view2.permute(0, 2, 3, 1).numpy()) == labels.tolist()


# ---------------------------------------------------------------------------- ops, one at a time


def test_identity_recipe_returns_the_normalised_image(images):
    view1, view2 = run_views([images["ramp_png"]], data_config(), 2)
    expected = normalise(images["ramp"])
    for v in (view1, view2):
        np.testing.assert_allclose(v, np.broadcast_to(expected, v.shape), atol=1e-5)


def test_normalisation_of_a_constant_colour_is_exact(images):
    grey = 8 + 15 * 5
    view1, _ = run_views([images["greys"][5]], data_config(mean=(0.3, 0.5, 0.7), std=(0.1, 0.2, 0.3)), 1)
    expected = (grey / 255.0 - np.array([0.3, 0.5, 0.7])) / np.array([0.1, 0.2, 0.3])
    np.testing.assert_allclose(view1[0], np.broadcast_to(expected, (S, S, 3)), atol=1e-5)


def test_flip_mirrors_the_image(images):
    view1, view2 = run_views([images["ramp_png"]], data_config(only(flip_p=1.0)), 2)
    np.testing.assert_allclose(view1, np.broadcast_to(normalise(images["ramp"][:, ::-1]), view1.shape), atol=1e-5)
    np.testing.assert_allclose(view2, np.broadcast_to(normalise(images["ramp"]), view2.shape), atol=1e-5)


def test_solarize_inverts_pixels_at_or_above_the_threshold(images):
    ramp = images["ramp"]
    view1, view2 = run_views([images["ramp_png"]], data_config(view2=only(solarize_p=1.0, solarize_threshold=0.5)), 2)
    expected = np.where(ramp / 255.0 >= 0.5, 255 - ramp, ramp).astype(np.uint8)  # DeepMind: x >= 0.5 -> 1 - x
    assert (expected != ramp).any() and (expected == ramp).any()
    np.testing.assert_allclose(view2, np.broadcast_to(normalise(expected), view2.shape), atol=1e-5)
    np.testing.assert_allclose(view1, np.broadcast_to(normalise(ramp), view1.shape), atol=1e-5)


def test_grayscale_copies_the_luma_to_three_channels(images):
    view1, _ = run_views([images["texture_png"]], data_config(only(grayscale_p=1.0)), 2)
    out = denormalise(view1)
    luma = images["texture"].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(out, np.broadcast_to(luma[..., None], out.shape), atol=0.5 + 1e-3)


@pytest.mark.parametrize("sigma, kernel", [(0.5, 23), (1.3, 23), (2.0, 23), (2.0, 7)])
@pytest.mark.parametrize("drawn", [False, True], ids=["fixed", "drawn"])
def test_blur_matches_torchvision_with_the_whole_window(tmp_path, sigma, kernel, drawn):
    """Against torchvision's blur with the configured window. The graph cuts each sample's window to
    2 ceil(4 sigma) + 1, at most the configured one (pipelines.pretrain.blur_window; computed in the
    graph when sigma is drawn), which may move a pixel across a rounding tie and no further: a 3-sigma
    window puts 1.4-6.8% of these pixels a level off, a 2-sigma one up to 5 levels."""
    rng = np.random.default_rng(3)
    sigmas = (sigma, sigma + 1e-6) if drawn else (sigma, sigma)
    for name, img in (("texture", smooth_texture(rng, 96, 96)), ("noise", rng.integers(0, 256, (96, 96, 3), np.uint8))):
        view1, _ = run_views([save(tmp_path / f"{name}.png", img)],
                             data_config(only(blur_p=1.0, blur_kernel=kernel, blur_sigma=sigmas), image_size=96), 1)
        expected = hwc(TF.gaussian_blur(chw(img), [kernel, kernel], [sigma, sigma])).astype(np.float32)  # reflect
        assert not np.array_equal(expected, img)
        diff = np.abs(denormalise(view1[0]) - expected)
        assert diff.max() <= 1.0 + 1e-3, name
        assert (diff > 0.5).mean() <= 0.005, name


def test_the_graph_computes_each_samples_blur_window_by_the_formula():
    """blur_window_node (the per-sample window of drawn sigmas) against blur_window's 2 ceil(4 sigma) + 1
    capped at the configured window, sample by sample, over sigmas that cross many whole radii."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=256, num_threads=1, device_id=None, seed=7)
    def windows():
        sigma = fn.random.uniform(range=(0.05, 4.0))
        return sigma, pretrain.blur_window_node(sigma, 23), pretrain.blur_window_node(sigma, 7)

    pipe = windows()
    pipe.build()
    sigma, w23, w7 = (np.array(out.as_array()) for out in pipe.run())
    assert len(set(w23.tolist())) > 8  # many windows seen, the cap (23 from sigma > 2.75) among them
    assert w23.tolist() == [min(23, 2 * math.ceil(4.0 * float(s)) + 1) for s in sigma]
    assert w7.tolist() == [min(7, 2 * math.ceil(4.0 * float(s)) + 1) for s in sigma]


def fitted(out_u8: np.ndarray, candidates, make) -> tuple[float, float]:
    """Best candidate factor f (and its max abs error, in levels) for out = make(f)."""
    errors = [np.abs(out_u8 - make(f)).max() for f in candidates]
    best = int(np.argmin(errors))
    return candidates[best], errors[best]


@pytest.mark.parametrize(
    "knob, strength, torchvision_op",
    [
        ("brightness", 0.4, TF.adjust_brightness),
        ("contrast", 0.4, TF.adjust_contrast),
        ("saturation", 0.4, TF.adjust_saturation),
    ],
)
def test_single_jitter_op_matches_torchvision_for_some_factor_in_range(images, knob, strength, torchvision_op):
    view = only(jitter_p=1.0, **{**dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0), knob: strength})
    view1, _ = run_views([images["texture_png"]] * 4, data_config(view), 4, seed=1)
    img = chw(images["texture"]).float() / 255.0
    factors = list(np.linspace(1 - strength, 1 + strength, 801))  # steps of 0.001: a fit within rounding
    found = []
    for out in denormalise(view1):
        f, err = fitted(out, factors, lambda f: hwc(torchvision_op(img, f)) * 255.0)
        assert err <= 1.0 + 1e-3, f"{knob}: no factor in range reproduces the output (best {f:.3f}, error {err:.2f})"
        found.append(f)
    assert len(set(np.round(found, 3))) > 1  # a random factor per sample


def hue_rotation(degrees: float) -> np.ndarray:
    """Rotation of RGB about the grey axis (right-handed), written out independently of the package."""
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    a, b = (1 - c) / 3, s / math.sqrt(3)
    return np.array([[c + a, a - b, a + b], [a + b, c + a, a - b], [a - b, a + b, c + a]])


def test_hue_is_a_grey_axis_rotation_within_the_range_that_moves_towards_torchvision(images):
    # 16 samples: the angle is uniform on +-36 degrees, so at least 2 of them reach 20 degrees but for
    # odds of about 1e-3 (with 8, 7%: a change of the random stream alone could leave one).
    view1, _ = run_views([images["texture_png"]] * 16, data_config(only(jitter_p=1.0, brightness=0.0, contrast=0.0,
                                                                        saturation=0.0, hue=0.1)), 16, seed=2)
    x = images["texture"].astype(np.float64)
    angles = list(np.linspace(-36, 36, 721))
    img = chw(images["texture"]).float() / 255.0
    checked = 0
    for out in denormalise(view1):
        deg, err = fitted(out, angles, lambda d: np.clip(x @ hue_rotation(d).T, 0, 255))
        assert err <= 1.0 + 1e-3, f"no rotation within +-36 degrees reproduces the output (error {err:.2f})"
        # torchvision's HSV shift is not linear: the rotation only approximates it, better the larger the
        # shift (on this texture its error is 0.84-0.87 of no shift's at 10 degrees, 0.76-0.78 at 20).
        if abs(deg) >= 20:
            tv = hwc(TF.adjust_hue(img, deg / 360.0)) * 255.0
            assert np.abs(out - tv).mean() < 0.8 * np.abs(x - tv).mean()  # closer than no shift at all
            checked += 1
    assert checked >= 2


def test_colour_matrices_compose_the_ops_in_the_drawn_order_like_torchvision():
    """A x + D mu, from the drawn values, against torchvision's functional ops applied one after another
    (no hue: see above). The recipe's factor ranges and the orders (itertools.permutations of
    torchvision's op numbers b, c, s, hue) are written out here."""
    view = ViewConfig(jitter_p=0.8, hue=0.0, grayscale_p=0.2)
    rng = np.random.default_rng(0)
    n = 96
    fire, gray, order, u = rng.random(n) < 0.8, rng.random(n) < 0.5, rng.integers(0, 24, n), rng.random((n, 4))
    values = colour.jitter_values(fire, u, view)
    a, d = colour.colour_matrices(values["b"], values["c"], values["s"], values["theta"], order, gray)
    img = torch.from_numpy(rng.uniform(0.4, 0.6, (3, 8, 8))).float()  # mid-grey: no op clamps
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    orders = list(itertools.permutations(range(4)))
    for k in range(n):
        expected = img
        if fire[k]:
            factors = [0.6 + 0.8 * u[k, 0], 0.6 + 0.8 * u[k, 1], 0.8 + 0.4 * u[k, 2]]
            for op in orders[order[k]]:
                if op < 3:
                    expected = ops[op](expected, float(factors[op]))
        if gray[k]:
            expected = TF.rgb_to_grayscale(expected, num_output_channels=3)
        x = img.permute(1, 2, 0).double().numpy()
        mu = x.reshape(-1, 3).mean(0)
        got = x @ a[k, :, :3].T + d[k, :, :3] @ mu
        # float32 torchvision, whose tensor grayscale weighs red 0.2989 (PIL and the package: 0.299)
        np.testing.assert_allclose(got, hwc(expected).astype(np.float64), atol=3e-4)


# ---------------------------------------------------------------------------- linear evaluation


def test_linear_eval_train_yields_full_normalised_batches(images):
    loader = DaliEvalLoader(images["jpegs"], list(range(16)), True, LinearDataConfig(image_size=S), READER,
                            4, "cpu", Shard(), 0, torch.device("cpu"))
    batches = list(loader)
    assert len(batches) == 4
    labels = sorted(int(y) for _, ys in batches for y in ys)
    assert labels == list(range(16))
    for x, _ in batches:
        assert x.shape == (4, 3, S, S) and x.is_contiguous(memory_format=torch.channels_last)
        assert x.min() < -1 and x.max() > 1  # normalised, not raw [0, 255]
