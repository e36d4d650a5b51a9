"""Schedules against the paper's formulas, evaluated by hand at chosen steps."""
import math

import pytest

from byol_fast.optim.schedules import lr_at, scaled_lr, tau_at


def test_scaled_lr_follows_linear_rule():
    # BYOL Appendix C: lr = 0.2 x 4096 / 256 = 3.2 for the 1000-epoch run
    assert scaled_lr(0.2, 4096) == pytest.approx(3.2)
    assert scaled_lr(0.3, 4096) == pytest.approx(4.8)


def test_lr_warmup_then_cosine():
    peak, warm, total = 4.8, 100, 1100
    assert lr_at(0, total, warm, peak) == 0.0
    assert lr_at(50, total, warm, peak) == pytest.approx(2.4)
    assert lr_at(100, total, warm, peak) == pytest.approx(peak)
    # half-way through the decay: cos(pi/2) = 0, so half the peak
    assert lr_at(600, total, warm, peak) == pytest.approx(peak / 2)
    # a quarter of the way: 0.5 (1 + cos(pi/4))
    assert lr_at(350, total, warm, peak) == pytest.approx(peak * 0.5 * (1 + math.sqrt(0.5)))
    assert lr_at(total, total, warm, peak) == pytest.approx(0.0, abs=1e-12)


def test_tau_rises_from_base_to_one():
    total = 1000
    assert tau_at(0, total, 0.996) == pytest.approx(0.996)
    assert tau_at(total, total, 0.996) == pytest.approx(1.0)
    # k = K/2: 1 - (1 - 0.99) * (0 + 1) / 2 = 0.995
    assert tau_at(500, total, 0.99) == pytest.approx(0.995)
    # k = K/3: cos(pi/3) = 0.5 -> 1 - 0.01 * 0.75
    assert tau_at(1000 / 3, total, 0.99) == pytest.approx(1 - 0.01 * 0.75)
    values = [tau_at(k, total, 0.99) for k in range(0, total + 1, 50)]
    assert values == sorted(values)
