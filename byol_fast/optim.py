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


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) as used by BYOL; see module docstring."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 1e-3):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["lars"]:
                grads = self._trust_scaled(params, grads, group["eta"])
            bufs = self._buffers(params, grads, group["momentum"])
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss

    @staticmethod
    def _trust_scaled(params, grads, eta: float):
        """g * eta * ||w|| / ||g|| per tensor, computed on the device (no host sync)."""
        w_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads))
        ratio = torch.where((w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm, torch.ones_like(w_norm))
        return torch._foreach_mul(grads, list(ratio.to(grads[0].dtype).unbind()))

    def _buffers(self, params, grads, momentum: float):
        """buf = momentum * buf + g, in place; a new buffer starts at 0, so its first value is g."""
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)
        return bufs
