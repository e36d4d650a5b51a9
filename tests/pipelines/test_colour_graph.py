"""The colour matrices the DALI graph builds (pipelines.pretrain.colour_maps), pulled out of a small
pipeline and checked sample by sample against the numpy reference (pipelines.colour), and the draws
behind them against the recipe: firing rates, the 24 orders, the factor and angle ranges.

The reference multiplies the maps one after another in the drawn order; the graph evaluates a table of
coefficients and composes with fn.transforms.combine. Saturation, hue and the contrast of the mean do
not commute, so a wrong order convention, a misplaced map or a wrong coefficient shows as a mismatch.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from nvidia.dali import pipeline_def

from byol_fast.config import DataConfig, ViewConfig
from conftest import READER, save, smooth_texture
from pipelines import colour
from pipelines.pretrain import build_pretrain_pipeline, colour_maps

N = 4096  # samples per check: each of the 24 orders about 140 times at the recipe's jitter_p


def graph_draws(view: ViewConfig, n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    """One batch of n samples of the graph's A, D and draws (fire, gray, order, u), as numpy arrays."""

    @pipeline_def(batch_size=n, num_threads=2, device_id=None, seed=seed)
    def maps():
        a, d, draws = colour_maps(view)
        return a, d, draws["fire"], draws["gray"], draws["order"], draws["u"]

    pipe = maps()
    pipe.build()
    a, d, fire, gray, order, u = (x.as_array() for x in pipe.run())
    return dict(a=a, d=d, fire=fire.astype(bool), gray=gray.astype(bool), order=order, u=u.reshape(n, 4),
                **colour.jitter_values(fire, u, view))


def rate_ok(flags: np.ndarray, p: float) -> bool:
    """A firing rate within 4 standard deviations of p."""
    return abs(flags.mean() - p) <= 4 * math.sqrt(p * (1 - p) / len(flags))


@pytest.mark.parametrize("view", [
    ViewConfig(),  # the recipe: jitter 0.8, grayscale 0.2, hue 0.1
    ViewConfig(jitter_p=1.0, grayscale_p=0.5, brightness=0.8, contrast=1.5, saturation=0.0, hue=0.5),
], ids=["recipe", "strong"])
def test_graph_matrices_equal_the_numpy_reference_in_every_case(view):
    g = graph_draws(view)
    ref_a, ref_d = colour.colour_matrices(g["b"], g["c"], g["s"], g["theta"], g["order"], g["gray"])
    assert g["a"].shape == g["d"].shape == (N, 3, 4) and g["a"].dtype == g["d"].dtype == np.float32
    np.testing.assert_allclose(g["a"], ref_a, atol=2e-6)
    np.testing.assert_allclose(g["d"], ref_d, atol=2e-6)
    # ... and the batch covered every case: each order with the jitter fired, grayscale on and off, and
    # the jitter not fired wherever jitter_p < 1.
    assert np.bincount(g["order"][g["fire"]], minlength=24).min() > 0
    assert g["gray"].any() and not g["gray"].all()
    assert g["fire"].all() if view.jitter_p == 1 else not g["fire"].all()


def test_not_fired_is_the_identity_and_grayscale_the_luma_projection():
    """Jitter off, grayscale always: A = J, D = 0; neither: A = I, D = 0 (written out, not from colour.py)."""
    luma = np.array([0.299, 0.587, 0.114])
    for view, expected in ((ViewConfig(jitter_p=0.0, grayscale_p=1.0), np.outer(np.ones(3), luma)),
                           (ViewConfig(jitter_p=0.0, grayscale_p=0.0), np.eye(3))):
        g = graph_draws(view, n=64)
        np.testing.assert_allclose(g["a"][:, :, :3], np.broadcast_to(expected, (64, 3, 3)), atol=1e-6)
        assert np.all(g["a"][:, :, 3] == 0)
        np.testing.assert_allclose(g["d"], 0.0, atol=1e-6)


def test_draws_follow_the_recipe():
    """Firing rates within 4 sigma, independent; orders uniform (chi-square); factors and angle uniform on
    torchvision's ranges, written out: brightness and contrast [0.6, 1.4], saturation [0.8, 1.2], hue
    +-0.1 turn = +-36 degrees."""
    g = graph_draws(ViewConfig(), seed=1)
    fire, gray = g["fire"], g["gray"]
    assert rate_ok(fire, 0.8) and rate_ok(gray, 0.2) and rate_ok(fire & gray, 0.16)
    counts = np.bincount(g["order"], minlength=24)
    assert len(counts) == 24
    expected = N / 24
    assert ((counts - expected) ** 2 / expected).sum() < 49.7  # chi-square, 23 degrees of freedom, 1e-3
    assert np.all(g["b"][~fire] == 1) and np.all(g["theta"][~fire] == 0)
    for key, lo, hi in (("b", 0.6, 1.4), ("c", 0.6, 1.4), ("s", 0.8, 1.2),
                        ("theta", -math.radians(36), math.radians(36))):
        values = g[key][fire]
        width = hi - lo
        assert lo <= values.min() < lo + 0.01 * width and hi - 0.01 * width < values.max() < hi
        assert abs(values.mean() - (lo + hi) / 2) < 4 * width / math.sqrt(12 * len(values))
    # The four uniforms are independent of each other (a shared draw would correlate them).
    assert np.abs(np.corrcoef(g["u"].T) - np.eye(4)).max() < 0.06


def test_the_two_view_graph_runs_no_python_per_batch(tmp_path):
    """Issue 11: no Python operator in the pretraining graph (it would take the GIL every batch)."""
    png = save(tmp_path / "x.png", smooth_texture(np.random.default_rng(0), 32, 32))
    data = DataConfig(image_size=32)
    data = dataclasses.replace(data, view1=dataclasses.replace(data.view1, blur_kernel=3),
                               view2=dataclasses.replace(data.view2, blur_kernel=3))
    pipe = build_pretrain_pipeline([png], data, READER, 2, "cpu", None, 0)
    graph = pipe.serialize()  # raises for a graph holding a Python operator (not serializable)
    assert b"PythonFunction" not in graph and b"python_function" not in graph
    view1, view2 = pipe.run()
    assert view1.as_array().shape == view2.as_array().shape == (2, 32, 32, 3)
