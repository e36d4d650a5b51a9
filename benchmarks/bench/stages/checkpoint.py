"""The ``checkpoint`` stage: the pause a checkpoint costs the training loop, on the BYOL learner's
state (online and target networks, predictor, LARS, scaler) at the config's backbone, measured by
``benchmarks/checkpoint_pause.py``."""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..progress import log
from .byol_step import new_learner, step_rates, synthetic_views
from .context import StageContext, StageUnavailable


def json_safe(x):
    """A measurement's return value as JSON: numbers, strings, lists and dicts; tensors as numbers."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def state_bytes(state) -> int:
    """Bytes of the tensors in a nested state dict."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def run_checkpoint(ctx: StageContext) -> dict:
    """Hands the learner's state to ``checkpoint_pause.measure(state, directory, repeats) -> dict`` and
    records its keys as they come."""
    # Imported here, not at the top: checkpoint_pause is an optional script beside the benchmark; if it
    # is missing or fails to import, this stage records why and the other stages still run.
    try:
        import checkpoint_pause
    except ImportError as e:
        raise StageUnavailable(f"benchmarks/checkpoint_pause.py is not importable ({e})") from None
    cfg = dataclasses.replace(ctx.cfg, compile=False)  # the state's size matters here, not the step's speed
    learner = new_learner(cfg, ctx.device)
    # One step first: LARS's momentum buffers exist only after it, and every real checkpoint holds them.
    learner.step([synthetic_views(cfg, ctx.device, min(ctx.batch, 32))], *step_rates(cfg))
    ctx.sync()
    state = learner.state_dict()
    ctx.shared.scratch.mkdir(parents=True, exist_ok=True)
    # On the benchmark's disk (bench_data/, as a run's out_dir would be), not /tmp, which may be RAM.
    directory = Path(tempfile.mkdtemp(prefix="checkpoint_pause_", dir=ctx.shared.scratch))
    repeats = ctx.settings.checkpoint_repeats
    t = time.perf_counter()
    try:
        figures = checkpoint_pause.measure(state, directory, repeats)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    log(f"  [checkpoint] {figures}")
    return {"img_per_s": None, "checkpoint": json_safe(figures), "repeats": repeats,
            "state_gb": state_bytes(state) / 2**30, "measure_seconds": time.perf_counter() - t}
