"""LARS against the formula written out independently, and the parameter groups."""
import copy
import math

import torch
from torch import nn

from byol_fast.models.byol import MLP
from byol_fast.optim.lars import LARS, param_groups


def reference_lars(weights, grads_per_step, lr, wd, eta, momentum, adapted):
    """BYOL's LARS, one tensor at a time in float64 Python-level math (docs/reference.md section 1)."""
    w = [x.double().clone() for x in weights]
    buf = [torch.zeros_like(x) for x in w]
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            g = g.double()
            if adapted[i]:
                g = g + wd * w[i]
                wn, gn = math.sqrt(float((w[i] ** 2).sum())), math.sqrt(float((g ** 2).sum()))
                if wn > 0 and gn > 0:
                    g = g * (eta * wn / gn)
            buf[i] = momentum * buf[i] + g
            w[i] = w[i] - lr * buf[i]
    return w


def test_lars_matches_formula_over_several_steps():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(5, 3))
    zero_weight = nn.Parameter(torch.zeros(4, 2))  # ||w|| = 0: no adaptation
    bias = nn.Parameter(torch.randn(5))
    params = [weight, zero_weight, bias]
    groups = [{"params": [weight, zero_weight], "weight_decay": 0.1, "lars": True},
              {"params": [bias], "weight_decay": 0.0, "lars": False}]
    opt = LARS(groups, lr=0.7, momentum=0.9, eta=0.02)
    start = [p.detach().clone() for p in params]
    history = []
    for _ in range(4):
        grads = [torch.randn_like(p) for p in params]
        history.append(grads)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    expected = reference_lars(start, history, lr=0.7, wd=0.1, eta=0.02, momentum=0.9, adapted=[True, True, False])
    for p, e in zip(params, expected):
        assert torch.allclose(p.detach().double(), e, atol=1e-5), (p, e)


def test_lr_sits_outside_momentum_buffer():
    # Changing lr between steps must rescale only the update, not the stored buffer.
    p = nn.Parameter(torch.ones(3))
    opt = LARS([{"params": [p], "weight_decay": 0.0, "lars": False}], lr=1.0, momentum=0.5)
    p.grad = torch.ones(3)
    opt.step()  # buf = 1, p = 0
    opt.param_groups[0]["lr"] = 0.1
    p.grad = torch.ones(3)
    opt.step()  # buf = 0.5 + 1 = 1.5, p = 0 - 0.15
    assert torch.allclose(p.detach(), torch.full((3,), -0.15))
    assert torch.allclose(opt.state[p]["momentum_buffer"], torch.full((3,), 1.5))


def test_bias_and_batchnorm_excluded():
    mlp = MLP(8, 16, 4)
    adapted, plain = param_groups(mlp, weight_decay=1e-6)
    names = {id(p): n for n, p in mlp.named_parameters()}
    assert sorted(names[id(p)] for p in adapted["params"]) == ["0.weight", "3.weight"]
    # Linear bias, BatchNorm gamma and beta
    assert sorted(names[id(p)] for p in plain["params"]) == ["0.bias", "1.bias", "1.weight"]
    assert plain["weight_decay"] == 0.0 and plain["lars"] is False
    assert adapted["weight_decay"] == 1e-6 and adapted["lars"] is True


def test_state_dict_round_trip_keeps_optimizers_identical():
    torch.manual_seed(1)
    a = nn.Linear(4, 3)
    b = nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt_a = LARS(param_groups(a, 1e-4), lr=0.5)
    for _ in range(3):
        a(torch.randn(2, 4)).sum().backward()
        opt_a.step()
        opt_a.zero_grad()
    b.load_state_dict(a.state_dict())
    opt_b = LARS(param_groups(b, 1e-4), lr=0.5)
    # a deep copy, as through torch.save/torch.load: load_state_dict keeps tensors it need not cast
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for _ in range(5):
        x = torch.randn(2, 4)
        for m, o in ((a, opt_a), (b, opt_b)):
            m(x).sum().backward()
            o.step()
            o.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
