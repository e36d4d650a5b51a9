"""One optimisation step: a non-finite step changes nothing; a finite one moves online and target."""
import copy

import torch

from byol_fast.config import load_config
from byol_fast.dist import DistInfo
from byol_fast.learner import Learner
from conftest import TINY_MODEL

TINY = TINY_MODEL + ["--channels_last=false"]


def make():
    torch.manual_seed(0)
    return Learner(load_config(None, TINY), torch.device("cpu"), DistInfo())


def snapshot(learner):
    return copy.deepcopy(learner.state_dict())


def same(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(x, y) for x, y in zip(a.values(), b.values()) if isinstance(x, torch.Tensor))


def test_nonfinite_step_is_skipped_and_counted():
    learner = make()
    views = (torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    learner.step([views], lr=0.1, tau=0.9)  # a real step first, so the optimizer has state
    before = snapshot(learner)
    bad = (torch.full((4, 3, 32, 32), float("nan")), views[1])
    learner.step([bad], lr=0.1, tau=0.9)
    after = snapshot(learner)
    for part in ("online", "predictor", "target"):
        assert same(before[part], after[part]), part  # batch-norm running statistics included
    state_b = before["optimizer"]["state"]
    state_a = after["optimizer"]["state"]
    assert state_b and state_b.keys() == state_a.keys()
    assert all(torch.equal(state_b[k]["momentum_buffer"], state_a[k]["momentum_buffer"]) for k in state_b)
    assert learner.skipped_in_row == 1 and learner.skipped_total == 1
    learner.step([views], lr=0.1, tau=0.9)
    assert learner.skipped_in_row == 0 and learner.skipped_total == 1


def test_finite_step_moves_online_and_target():
    learner = make()
    before = snapshot(learner)
    learner.step([(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))], lr=0.5, tau=0.5)
    after = snapshot(learner)
    w = "encoder.conv1.weight"
    assert not torch.equal(before["online"][w], after["online"][w])
    # target = 0.5 * old target + 0.5 * new online (old target == old online at start)
    expected = 0.5 * before["target"][w] + 0.5 * after["online"][w]
    assert torch.allclose(after["target"][w], expected, atol=1e-6)
