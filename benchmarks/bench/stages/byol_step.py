"""The BYOL training step, through :class:`byol_fast.pretrain.learner.Learner` (the code
byol_fast.train runs: both views, online forward/backward, target forward, LARS, EMA): alone on
synthetic device tensors (``model``), and fed by a loader (``e2e-dali``, ``e2e-torchvision``)."""
from __future__ import annotations

import torch
# Internal but stable since torch 2.0; figures for the record only.
from torch._dynamo.utils import counters as dynamo_counters

from byol_fast.optim.schedules import scaled_lr
from byol_fast.pretrain.learner import Learner
from byol_fast.runtime.device import to_device
from byol_fast.runtime.dist import DistInfo

from ..timing import measure, measure_fed
from .context import KeptLearner, Shared, StageContext
from .loaders import pretrain_loader, worker_rounds


def synthetic_views(cfg, device, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of random views at the config's size, on the device in its memory format."""
    size = cfg.data.image_size
    g = torch.Generator().manual_seed(cfg.seed)
    return tuple(to_device(torch.randn(batch, 3, size, size, generator=g), device, cfg.channels_last) for _ in range(2))


def synthetic_windows(device, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop windows (x0, y0, x1, y1, flip) of a 500 x 400 image for the two views, overlapping by
    half, no flips: what a PixPro step needs besides its views (its cost does not depend on them)."""
    first = torch.tensor([0.0, 0.0, 300.0, 300.0, 0.0]).repeat(batch, 1)
    second = torch.tensor([150.0, 100.0, 450.0, 400.0, 0.0]).repeat(batch, 1)
    return first.to(device), second.to(device)


def step_rates(cfg) -> tuple[float, float]:
    """The peak learning rate and the first tau: the step's cost does not depend on their values."""
    return scaled_lr(cfg.optim.lr, cfg.optim.batch_size), cfg.ema.tau_base


def new_learner(cfg, device) -> Learner:
    torch.manual_seed(cfg.seed)
    learner = Learner(cfg, device, DistInfo())
    learner.model.train()
    return learner


def step_signature(cfg, precision: str) -> dict:
    """What makes two BYOL steps the same step: an end-to-end figure is compared with the step alone
    of the same signature (model stage), never with another batch or compile mode."""
    return {"backbone": cfg.model.backbone, "loss": cfg.model.loss, "image_size": cfg.data.image_size,
            "batch": cfg.optim.batch_size,
            "compile": getattr(cfg, "compile_mode", "default") if cfg.compile else False, "precision": precision}


def precision_of(learner: Learner) -> str:
    return str(learner.amp_dtype).replace("torch.", "")


def fresh_compile(shared: Shared) -> None:
    """Before a compiled learner is built: forget torch.compile's graphs, so that its warm-up time is
    its own compile time and earlier stages' graphs do not fill dynamo's recompile limit (past it,
    dynamo runs the model eagerly without failing, and the 'compiled' figure would be eager's).
    A kept compiled learner would have to compile again: it is let go."""
    torch._dynamo.reset()
    dynamo_counters.clear()
    if shared.kept and shared.kept.learner.cfg.compile:
        shared.kept = None


def dynamo_figures(cfg) -> dict:
    """Graph breaks and graphs of a compiled stage (a break or an unexpected recompile costs speed)."""
    if not cfg.compile:
        return {}
    try:
        return {"dynamo_graph_breaks": sum(dynamo_counters["graph_break"].values()),
                "dynamo_unique_graphs": dynamo_counters["stats"].get("unique_graphs", 0)}
    except Exception:  # noqa: BLE001  a label, never a reason to lose the stage
        return {}


def keep_if_fastest(shared: Shared, key: str, learner: Learner, rate: float) -> None:
    """Keep the fastest model stage's learner warm for ``step=best`` end-to-end stages: with
    torch.compile they then time the very same compiled step, without compiling it again. One
    learner at most (its weights and LARS state, about 0.4 GB for ResNet-50), so that the memory
    figures and OOM probes of later stages are not distorted by a collection of them."""
    if shared.kept is None or rate > shared.kept.rate:
        shared.kept = KeptLearner(key, learner, rate)


def _step_record(learner: Learner, cfg) -> dict:
    precision = precision_of(learner)
    return {"precision": precision, "step": step_signature(cfg, precision)}


def run_model(ctx: StageContext) -> dict:
    """The BYOL step alone on synthetic device tensors."""
    cfg = ctx.cfg
    if cfg.compile:
        fresh_compile(ctx.shared)
    learner = new_learner(cfg, ctx.device)
    lr, tau = step_rates(cfg)
    inputs = synthetic_views(cfg, ctx.device, ctx.batch)
    if learner.byol.pixels:  # PixPro pairs pixels by the views' crop windows: two overlapping ones
        inputs += synthetic_windows(ctx.device, ctx.batch)
    out = measure(lambda: learner.step([inputs], lr, tau), ctx.batch, ctx.sync, ctx.plan, ctx.key)
    if cfg.model.loss == "instance":  # the only steps step=best borrows: a PixPro learner is never kept
        keep_if_fastest(ctx.shared, ctx.key, learner, out["img_per_s"]["median"])
    # skipped_steps: a step whose loss is not finite skips LARS and EMA and is cheaper; on synthetic
    # views this should stay 0, else the figure flatters the step.
    return {**out, **_step_record(learner, cfg), "skipped_steps": learner.skipped_total, **dynamo_figures(cfg)}


def _run_e2e(kind: str, ctx: StageContext) -> dict:
    """Loader -> device -> BYOL step. ``ctx.best``: the model stage whose step this one runs
    (``step=best``); its learner is reused when it is the one kept warm."""
    cfg, device, kept = ctx.cfg, ctx.device, ctx.shared.kept
    reused = bool(ctx.best and kept and kept.key == ctx.best)
    if reused:
        learner = kept.learner
    else:
        if cfg.compile:
            fresh_compile(ctx.shared)
        learner = new_learner(cfg, device)
    lr, tau = step_rates(cfg)
    out = measure_fed(pretrain_loader(kind, ctx.shared.index, cfg, device),
                      lambda views: tuple(to_device(v, device, cfg.channels_last) for v in views),
                      lambda views: learner.step([views], lr, tau), ctx.batch, device, ctx.plan, ctx.key,
                      rounds=worker_rounds(kind, cfg))
    return {**out, **_step_record(learner, cfg), "step_stage": ctx.best, "step_learner_reused": reused,
            "skipped_steps": learner.skipped_total,  # a reused learner's: since it was built
            **dynamo_figures(cfg)}


def run_e2e_dali(ctx: StageContext) -> dict:
    """DALI's two-view loader -> device -> BYOL step."""
    return _run_e2e("dali", ctx)


def run_e2e_torchvision(ctx: StageContext) -> dict:
    """The torchvision DataLoader -> device -> BYOL step."""
    return _run_e2e("torchvision", ctx)
