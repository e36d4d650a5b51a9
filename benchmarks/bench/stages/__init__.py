"""What each stage runs, by name: :data:`RUNNERS` maps a stage's name (:data:`bench.entries.STAGES`)
to a function of its :class:`~bench.stages.context.StageContext` that returns the stage's record
(its figures as the JSON holds them).

- :mod:`.loaders`: ``dali``, ``torchvision``, the two-view data path alone;
- :mod:`.shards`: ``shards``, the same images packed as a shard set;
- :mod:`.byol_step`: ``model``, the BYOL step alone, and ``e2e-dali``, ``e2e-torchvision``, fed by a loader;
- :mod:`.linear`: ``linear``, ``e2e-linear``, linear evaluation's step alone and fed by its loader;
- :mod:`.checkpoint`: ``checkpoint``, the training-loop pause of a checkpoint.
"""
from __future__ import annotations

from typing import Callable

from .byol_step import run_e2e_dali, run_e2e_torchvision, run_model
from .checkpoint import run_checkpoint
from .context import StageContext
from .linear import run_e2e_linear, run_linear
from .loaders import run_dali, run_torchvision
from .shards import run_shards

RUNNERS: dict[str, Callable[[StageContext], dict]] = {
    "dali": run_dali,
    "shards": run_shards,
    "torchvision": run_torchvision,
    "model": run_model,
    "e2e-dali": run_e2e_dali,
    "e2e-torchvision": run_e2e_torchvision,
    "linear": run_linear,
    "e2e-linear": run_e2e_linear,
    "checkpoint": run_checkpoint,
}
