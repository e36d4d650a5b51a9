"""One BYOL optimisation step, independent of data, logging and checkpoint files.

Used by the training driver and by ``benchmarks/throughput.py`` so that both time the same
code: wrapping (SyncBN -> device/channels_last -> autocast -> DDP), LARS, EMA.
"""
from __future__ import annotations

import contextlib

import torch

from . import dist
from .config import Config
from .model import BYOL
from .optim import LARS, param_groups
from .runtime import resolve_precision


class Learner:
    """The wrapped BYOL model, its LARS optimizer and its precision policy."""

    def __init__(self, cfg: Config, device: torch.device, info: dist.DistInfo):
        self.cfg, self.device = cfg, device
        self.amp_dtype = resolve_precision(cfg.precision, device)
        self.model = dist.wrap(BYOL(cfg.model), device, info, cfg.sync_bn, cfg.channels_last)
        self.byol: BYOL = dist.unwrap(self.model)
        trainable = torch.nn.ModuleList([self.byol.online, self.byol.predictor])
        self.optimizer = LARS(param_groups(trainable, cfg.optim.weight_decay), lr=0.0,
                              momentum=cfg.optim.momentum, eta=cfg.optim.eta)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        # The last micro-batch's detached outputs for the monitors (BYOL.forward without "loss"):
        # projection, representation, prediction (view 1) and target_projection (view 2).
        self.last: dict[str, torch.Tensor] = {}
        self.skipped_in_row = 0  # consecutive non-finite steps
        # Batch-norm running statistics, saved before each step: a NaN batch would poison them
        # (and with them every later evaluation), so a skipped step puts them back.
        self._stats = list(self.byol.buffers())
        self._stats_backup = [b.clone() for b in self._stats]
        self.skipped_total = 0

    def step(self, micro_batches, lr: float, tau: float) -> torch.Tensor:
        """Forward/backward over the micro-batches, one LARS step, one EMA update.

        ``micro_batches`` is a list of (view1, view2) pairs, each (N, 3, H, W) on the device.
        Returns the mean loss as a device tensor. A step whose loss or gradients are not finite
        is skipped (weights, batch-norm statistics, optimizer and EMA untouched) and counted in
        ``skipped_in_row``.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        torch._foreach_copy_(self._stats_backup, self._stats)
        n = len(micro_batches)
        for i, (view1, view2) in enumerate(micro_batches):
            # DDP all-reduces gradients only on the last micro-batch.
            accumulating = i < n - 1 and hasattr(self.model, "no_sync")
            with self.model.no_sync() if accumulating else contextlib.nullcontext():
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
                    out = self.forward(view1, view2)
                self.scaler.scale(out["loss"] / n).backward()
            total += out["loss"].detach() / n
        self.last = {k: v for k, v in out.items() if k != "loss"}
        if not self._finite(total):
            self.optimizer.zero_grad(set_to_none=True)
            torch._foreach_copy_(self._stats, self._stats_backup)
            self.skipped_in_row += 1
            self.skipped_total += 1
            return total
        self.skipped_in_row = 0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.byol.update_target(tau)
        return total

    def _finite(self, loss: torch.Tensor) -> bool:
        """Loss and gradients all finite? With fp16 the GradScaler already skips overflowing
        gradients (and lowers its scale), so only the loss is checked there.

        Host sync: the one per step in the loop, the price of never applying a NaN update
        (about a millisecond against a ResNet-50 step of hundreds).
        """
        if self.scaler.is_enabled():
            return bool(torch.isfinite(loss))
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        total = loss + torch.stack(torch._foreach_norm(grads)).sum() if grads else loss
        return bool(torch.isfinite(total))

    def state_dict(self) -> dict:
        return {"online": self.byol.online.state_dict(), "predictor": self.byol.predictor.state_dict(),
                "target": self.byol.target.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.byol.online.load_state_dict(state["online"])
        self.byol.predictor.load_state_dict(state["predictor"])
        self.byol.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
