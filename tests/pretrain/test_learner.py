"""One optimisation step: a non-finite step changes nothing; a finite one moves online and target."""
import copy

import torch

from byol_fast.config import load_config
from byol_fast.runtime.dist import DistInfo
from byol_fast.pretrain.learner import Learner
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
    assert not learner.ok and learner.skipped_total == 1
    learner.step([bad], lr=0.1, tau=0.9)
    learner.step([views], lr=0.1, tau=0.9)
    assert learner.ok and learner.skipped_total == 2
    assert learner.read_skips() == (0, 2, 2)  # none in a row now, 2 since the last read, longest run 2
    learner.step([bad], lr=0.1, tau=0.9)
    assert learner.read_skips() == (1, 1, 1)  # the longest run restarts at each read


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


def forbid_host_reads(monkeypatch):
    """Every way a tensor's value reaches Python raises: what a host sync would be on a GPU."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor was read on the host inside a training step")

    for name in ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def test_steps_between_log_points_never_read_a_tensor(monkeypatch):
    learner = make()
    views = (torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    bad = (torch.full((4, 3, 32, 32), float("nan")), views[1])
    learner.step([views], lr=0.1, tau=0.9)  # buffers exist: the first step is like every other
    with monkeypatch.context() as m:
        forbid_host_reads(m)
        for batches in ([views], [bad], [views, views], [bad, views]):  # finite, skipped, accumulated
            learner.step(batches, lr=0.05, tau=0.99)
    assert learner.read_skips() == (1, 2, 1)  # the last step was skipped; two in all
