"""One BYOL optimisation step, independent of data, logging and checkpoint files.

Used by the training driver and by ``benchmarks/throughput.py`` so that both time the same
code: wrapping (SyncBN -> device/channels_last -> autocast -> DDP), LARS, EMA.

No host sync inside a step. Whether a step is finite (loss and every gradient) is decided on the
device, and the update, the batch-norm statistics restore, the EMA and the skip counters are all
conditioned on that flag there, so the CPU can queue step k+1 while the GPU still runs step k. The
counters are device tensors that the driver reads at its log points (:meth:`Learner.read_skips`).

With ``compile: true`` two graphs are compiled: the wrapped model's forward (both views, online,
predictor, target and loss; AOTAutograd compiles its backward with it, and DDP's compiled wrapper
splits the graph at its gradient buckets), and :func:`finish_step` (the finite check, LARS, the
batch-norm restore, the EMA and the counters, ``torch._foreach_*`` code that fuses into a few
kernels). lr and tau enter both as device tensors, so new values never recompile; a resolution
ramp's sides compile the forward once each, for its static shape. Not compiled:
the backward call itself and the GradScaler's unscale/update (a few kernels, fp16 only), and the
Python loop over micro-batches, which has to call DDP's ``no_sync``.
"""
from __future__ import annotations

import contextlib

import torch
import torch._dynamo

from byol_fast.config import Config
from byol_fast.models.byol import BYOL
from byol_fast.optim.lars import LARS, lars_update, param_groups
from byol_fast.runtime import dist
from byol_fast.runtime.device import resolve_precision
from byol_fast.weights.backbone_match import load_backbone_weights
from byol_fast.weights.encoder_file import read_encoder_weights


@torch.no_grad()
def finish_step(loss: torch.Tensor, groups: list[tuple[list, list, list]], hyper: list[dict],
                stats: list[torch.Tensor], stats_backup: list[torch.Tensor], byol: BYOL,
                lr: torch.Tensor, tau: torch.Tensor, counters: torch.Tensor) -> None:
    """Everything after the backward pass, on the device and without a host sync.

    ok = loss and every gradient finite. Then LARS (``groups``: per parameter group its params,
    gradients and momentum buffers; ``hyper``: their fixed hyperparameters), the batch-norm running
    statistics put back from ``stats_backup`` where not ok (a NaN batch would poison them), the EMA of
    the target, and ``counters`` (int64: skipped in a row, skipped in all, the longest run in a row
    since the last read), every one of them a no-op where not ok.
    """
    grads = [g for _, gs, _ in groups for g in gs]
    norms = torch.stack(torch._foreach_norm(grads)).sum() if grads else torch.zeros_like(loss)
    ok = torch.isfinite(loss + norms)
    for (params, grads, bufs), h in zip(groups, hyper):
        if params:
            lars_update(params, grads, bufs, lr, ok, **h)
    for s, b in zip(stats, stats_backup):
        s.copy_(torch.where(ok, s, b))
    byol.update_target(tau, ok)
    in_row = torch.where(ok, 0, counters[0] + 1)
    counters.copy_(torch.stack([in_row, counters[1] + (~ok).long(), torch.maximum(counters[2], in_row)]))


def init_encoders(byol: BYOL, path: str) -> None:
    """Start the online and target encoders from the torchvision ResNet state_dict at ``path``
    (``model.init``: supervised weights on disk; read without running code, every key checked)."""
    weights = read_encoder_weights(path, backbone=byol.cfg.backbone)
    for tower in (byol.online, byol.target):
        load_backbone_weights(tower.encoder, weights.state, path)


class Learner:
    """The wrapped BYOL model, its LARS optimizer and its precision policy."""

    def __init__(self, cfg: Config, device: torch.device, info: dist.DistInfo):
        self.cfg, self.device = cfg, device
        self.amp_dtype = resolve_precision(cfg.precision, device)
        byol = BYOL(cfg.model)
        if cfg.model.init:
            init_encoders(byol, cfg.model.init)
        self.model = dist.wrap(byol, device, info, cfg.sync_bn, cfg.channels_last)
        self.byol: BYOL = dist.unwrap(self.model)
        trainable = torch.nn.ModuleList([self.byol.online, self.byol.predictor]
                                        + ([self.byol.propagation] if self.byol.pixels else []))
        self.optimizer = LARS(param_groups(trainable, cfg.optim.weight_decay), lr=0.0,
                              momentum=cfg.optim.momentum, eta=cfg.optim.eta)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.forward, self._finish = self.model, finish_step
        if cfg.compile:
            # A resolution ramp's sides: each compiled once, for its static shape (kernels tuned to it,
            # a CUDA graph each under reduce-overhead), never as a dynamic-shape graph.
            sides = len(set(cfg.data.sizes(cfg.epochs)))
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * sides)
            self.forward = torch.compile(self.model, mode=cfg.compile_mode, dynamic=False if sides > 1 else None)
            self._finish = torch.compile(finish_step, mode=cfg.compile_mode)
        # The last micro-batch's detached outputs for the monitors (BYOL.forward without "loss"):
        # projection, representation, prediction (view 1) and target_projection (view 2).
        self.last: dict[str, torch.Tensor] = {}
        # Batch-norm running statistics, saved before each step: a skipped step puts them back.
        self._stats = list(self.byol.buffers())
        self._stats_backup = [b.clone() for b in self._stats]
        # Filled in place each step (a kernel launch each, never a host-to-device copy that could sync).
        self._lr = torch.zeros((), device=device)
        self._tau = torch.zeros((), device=device)
        self._counters = torch.zeros(3, dtype=torch.int64, device=device)  # in a row, in all, longest run
        self._read_total = 0

    @property
    def ok(self) -> torch.Tensor:
        """Device bool: was the last step applied (finite)? For the monitors that follow it."""
        return self._counters[0] == 0

    def step(self, micro_batches, lr: float, tau: float) -> torch.Tensor:
        """Forward/backward over the micro-batches, one LARS step, one EMA update; no host sync.

        ``micro_batches`` is a list of (view1, view2) pairs, each (N, 3, H, W) on the device, or with
        PixPro (view1, view2, window1, window2), windows (N, 5) (BYOL.forward).
        Returns the mean loss as a device tensor. A step whose loss or gradients are not finite
        changes nothing (weights, batch-norm statistics, optimizer and EMA) and is counted on the
        device: :meth:`read_skips` at the next log point says so.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr  # for the record (state_dict, logs); the step reads self._lr
        self._lr.fill_(lr)
        self._tau.fill_(tau)
        total = torch.zeros((), device=self.device)
        torch._foreach_copy_(self._stats_backup, self._stats)
        n = len(micro_batches)
        for i, inputs in enumerate(micro_batches):
            # DDP all-reduces gradients only on the last micro-batch.
            accumulating = i < n - 1 and hasattr(self.model, "no_sync")
            with self.model.no_sync() if accumulating else contextlib.nullcontext():
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
                    out = self.forward(*inputs)
                self.scaler.scale(out["loss"] / n).backward()
            total += out["loss"].detach() / n
        self.last = {k: v for k, v in out.items() if k != "loss"}
        if self.scaler.is_enabled():  # fp16: true gradients (an overflow shows as inf, skipped below)
            self.scaler.unscale_(self.optimizer)
        self._finish(total, self.optimizer.tensors(),
                     [LARS.hyperparameters(g) for g in self.optimizer.param_groups],
                     self._stats, self._stats_backup, self.byol, self._lr, self._tau, self._counters)
        if self.scaler.is_enabled():
            self.scaler.update()  # lowers the scale after an overflow, on the device
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def read_skips(self) -> tuple[int, int, int]:
        """(skipped in a row now, skipped since the last read, the longest run in a row since the last
        read). A host sync: for log points only. Resets the longest run."""
        in_row, total, longest = self._counters.tolist()
        self._counters[2] = in_row
        new, self._read_total = total - self._read_total, total
        return in_row, new, longest

    @property
    def skipped_total(self) -> int:
        """Skipped steps in all (a host sync)."""
        return int(self._counters[1])

    def state_dict(self) -> dict:
        """The checkpoint's model part: online, predictor, target (and with PixPro the propagation
        module), optimizer and scaler."""
        extra = {"propagation": self.byol.propagation.state_dict()} if self.byol.pixels else {}
        return {"online": self.byol.online.state_dict(), "predictor": self.byol.predictor.state_dict(),
                "target": self.byol.target.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), **extra}

    def load_state_dict(self, state: dict) -> None:
        self.byol.online.load_state_dict(state["online"])
        self.byol.predictor.load_state_dict(state["predictor"])
        if self.byol.pixels:
            self.byol.propagation.load_state_dict(state["propagation"])
        self.byol.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
