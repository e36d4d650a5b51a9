"""The BYOL loss against a hand computation."""
import math

import torch

from byol_fast.models.loss import byol_loss, regression_loss


def test_regression_loss_by_hand():
    q = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    z = torch.tensor([[0.0, 2.0], [6.0, 8.0], [-1.0, -1.0]])
    # cos = 0, 1, -1  ->  2 - 2cos = 2, 0, 4
    assert torch.allclose(regression_loss(q, z), torch.tensor([2.0, 0.0, 4.0]), atol=1e-6)


def test_regression_loss_is_squared_distance_of_unit_vectors():
    q = torch.tensor([[2.0, 1.0, -1.0]])
    z = torch.tensor([[0.5, -3.0, 2.0]])
    qn = [x / math.sqrt(6.0) for x in (2.0, 1.0, -1.0)]
    zn = [x / math.sqrt(13.25) for x in (0.5, -3.0, 2.0)]
    expected = sum((a - b) ** 2 for a, b in zip(qn, zn))
    assert abs(regression_loss(q, z).item() - expected) < 1e-5


def test_symmetric_terms_are_summed_not_averaged():
    q1 = torch.tensor([[1.0, 0.0]])
    q2 = torch.tensor([[0.0, 1.0]])
    z1 = torch.tensor([[0.0, 1.0]])  # q2 vs z1: cos 1 -> 0
    z2 = torch.tensor([[-1.0, 0.0]])  # q1 vs z2: cos -1 -> 4
    assert byol_loss(q1, q2, z1, z2).item() == 4.0


def test_loss_in_fp32_from_half_inputs_and_no_target_gradient():
    q = (torch.randn(4, 8) * 300).half().requires_grad_()
    z = (torch.randn(4, 8) * 300).half().requires_grad_()
    loss = regression_loss(q, z)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.sum().backward()
    assert q.grad is not None and z.grad is None
