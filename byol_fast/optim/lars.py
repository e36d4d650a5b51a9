"""LARS in BYOL's form, with multi-tensor kernels, and the parameter groups it needs.

One step, per parameter tensor w with gradient g (DeepMind's byol/utils/optimizers.py):

    g'  = g + wd * w                                   (weight decay)
    g'' = g' * eta * ||w|| / ||g'||   if both norms > 0 (trust ratio; else g'' = g')
    buf = momentum * buf + g''
    w   = w - lr * buf                                 (lr outside the momentum buffer)

Biases and batch-norm parameters (every tensor with fewer than 2 dimensions) skip both the
weight decay and the trust ratio. Note this is not apex/timm's LARC, whose ratio is
eta * ||w|| / (||g|| + wd * ||w||).
"""
from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters: weights (decay + adaptation) and biases/BN (neither)."""
    adapted, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (adapted if p.ndim > 1 else plain).append(p)
    return [
        {"params": adapted, "weight_decay": weight_decay, "lars": True},
        {"params": plain, "weight_decay": 0.0, "lars": False},
    ]


def lars_update(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
                lr: torch.Tensor, ok: torch.Tensor | None, *, weight_decay: float, momentum: float, eta: float,
                trust: bool) -> None:
    """One LARS update of ``params`` and their momentum ``bufs`` in place (see the module docstring).

    ``lr`` is a 0-dim tensor on the parameters' device (a compiled step reads it as an input, so a new
    lr each step never recompiles). ``ok`` (0-dim bool, or None for "yes") applies the update or leaves
    params and buffers exactly as they were, decided on the device: the gradients are zeroed where
    not ok (so a NaN never enters), the momentum factor becomes 1 and the lr 0, and ``1 * buf + 0`` and
    ``w - 0 * buf`` are exact. No host sync either way.
    """
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if ok is not None:
        grads = [torch.where(ok, g, 0.0) for g in grads]
        momentum = torch.where(ok, momentum, 1.0)
        lr = torch.where(ok, lr, 0.0)
    if trust:
        w_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads))
        ratio = torch.where((w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm, torch.ones_like(w_norm))
        grads = torch._foreach_mul(grads, list(ratio.to(grads[0].dtype).unbind()))
    torch._foreach_mul_(bufs, momentum)  # buf = momentum * buf + g (a new buffer is 0: its first value is g)
    torch._foreach_add_(bufs, grads)
    torch._foreach_sub_(params, torch._foreach_mul(bufs, lr))  # lr outside the momentum buffer


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) as used by BYOL; see module docstring.

    ``step()`` is the usual optimizer step. The training step calls :meth:`tensors` and
    :func:`lars_update` itself, with lr as a device tensor and the finite flag ``ok``, so that the
    update can be compiled and conditioned on the device.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 1e-3):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, (params, grads, bufs) in zip(self.param_groups, self.tensors()):
            if params:
                lr = torch.tensor(group["lr"], dtype=params[0].dtype, device=params[0].device)
                lars_update(params, grads, bufs, lr, None, **self.hyperparameters(group))
        return loss

    @staticmethod
    def hyperparameters(group: dict) -> dict:
        """The keyword arguments of :func:`lars_update` for ``group`` (fixed for a run: compiled as constants)."""
        return dict(weight_decay=group["weight_decay"], momentum=group["momentum"], eta=group["eta"],
                    trust=group["lars"])

    def tensors(self) -> list[tuple[list, list, list]]:
        """Per group: (params with a gradient, their gradients, their momentum buffers), creating
        missing buffers as zeros. Looked up every step: ``load_state_dict`` replaces the buffers."""
        out = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            out.append((params, [p.grad for p in params], bufs))
        return out
