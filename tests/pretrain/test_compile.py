"""``compile: true``: the compiled step (forward + loss + backward, LARS + EMA) against the eager one.

One compiled learner (torch.compile's default backend, Inductor, generating C++ here) and one eager
learner, from the same weights, take the same steps; the updates they make must agree to float
tolerance, and after the warm-up step no new lr, tau, skipped step or accumulation may recompile.
The CPU demo's backbone keeps the compilation to about a minute on two cores.
"""
import copy

import pytest
import torch
import torch._dynamo

from byol_fast.config import load_config
from byol_fast.runtime.dist import DistInfo
from byol_fast.pretrain.learner import Learner

ARGS = ["--model.backbone=tiny_resnet", "--model.projector_hidden=32", "--model.projector_out=16",
        "--model.predictor_hidden=32", "--channels_last=false", "--optim.weight_decay=1e-4"]


def learner(*extra):
    torch.manual_seed(0)
    return Learner(load_config(None, ARGS + list(extra)), torch.device("cpu"), DistInfo())


def weights(lrn):
    return {f"{part}.{k}": v.detach().clone() for part in ("online", "predictor", "target")
            for k, v in getattr(lrn.byol, part).state_dict().items() if v.is_floating_point()}


@pytest.mark.slow
def test_compiled_step_matches_eager_and_never_recompiles():
    torch._dynamo.reset()
    eager, compiled = learner(), learner("--compile=true")
    g = torch.Generator().manual_seed(1)
    views = [(torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)) for _ in range(3)]
    nan = (torch.full_like(views[0][0], float("nan")), views[0][1])
    schedule = [([views[0]], 0.02, 0.9)]  # warm-up: compiles both graphs
    schedule += [([views[1]], 0.015, 0.95), ([nan], 0.01, 0.96), ([views[2], views[0]], 0.005, 0.99)]
    start = weights(eager)
    assert all(torch.equal(v, weights(compiled)[k]) for k, v in start.items())
    for i, (batches, lr, tau) in enumerate(schedule):
        before = weights(eager)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            loss_c = compiled.step(batches, lr, tau)
        loss_e = eager.step(batches, lr, tau)
        if i == 2:  # the NaN step: skipped by both, nothing moved
            assert not compiled.ok and not eager.ok
            assert all(torch.equal(v, weights(compiled)[k]) for k, v in weights(eager).items())
            continue
        assert torch.allclose(loss_c, loss_e, rtol=1e-4), (i, loss_c, loss_e)
        # The update each made, tensor by tensor, within float tolerance of the other's (relative to
        # its size: reductions run in another order; batch-norm's running statistics included).
        after_e, after_c = weights(eager), weights(compiled)
        for k in before:
            step_e, step_c = after_e[k] - before[k], after_c[k] - before[k]
            scale = step_e.norm() + 1e-5 * before[k].norm() + 1e-12
            assert (step_c - step_e).norm() / scale < 2e-2, (i, k, float((step_c - step_e).norm() / scale))
        # The next step starts both from the same state, so errors never compound (a deep copy, as
        # through a checkpoint file: load_state_dict would otherwise share the momentum buffers).
        compiled.load_state_dict(copy.deepcopy(eager.state_dict()))
    assert compiled.read_skips() == eager.read_skips() == (0, 1, 1)
