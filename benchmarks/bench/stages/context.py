"""What a stage is handed: its :class:`StageContext` (its entry, config, device, timing plan) and the
run's :class:`Shared` state (the benchmark's index, the warm learner, the packed shard sets)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from byol_fast.config import Config
from byol_fast.datasets.samples import Index
from byol_fast.pretrain.learner import Learner

from ..machine import HostPeak
from ..settings import Settings
from ..timing import Plan, device_sync


class StageUnavailable(RuntimeError):
    """A stage that cannot run here, for a reason its message says in full (no traceback printed)."""


@dataclasses.dataclass
class KeptLearner:
    """The learner of the fastest model stage so far (``key``), kept warm for ``step=best``."""

    key: str
    learner: Learner
    rate: float


@dataclasses.dataclass
class PackedSet:
    """A shard set packed in this run under ``folder``; ``shard_set`` None: its packing failed."""

    folder: Path
    shard_set: object | None = None
    record: dict | None = None


@dataclasses.dataclass
class Shared:
    """What the stages of one run share: the checked index of the benchmark's files, the scratch
    folder on the benchmark's disk, the learner kept warm and the shard sets packed so far (by shard
    size, removed at the end of the run)."""

    index: Index | None
    scratch: Path | None
    kept: KeptLearner | None = None
    shard_sets: dict[int, PackedSet] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StageContext:
    """One stage entry as it runs: ``key`` (``model:batch=512``), its stage ``name`` and ``options``,
    the Config of the variant, the device, how it is timed and what the run shares. ``host_peak``:
    the peak-memory sampler of the stage, restarted by a stage whose set-up must stay out of its
    figure; ``best``: for ``step=best``, the model stage whose step an end-to-end stage runs."""

    key: str
    name: str
    options: dict
    cfg: Config
    device: torch.device
    plan: Plan
    settings: Settings
    shared: Shared
    host_peak: HostPeak | None = None
    best: str | None = None

    @property
    def batch(self) -> int:
        """Images per step (one image = both of its views)."""
        return self.cfg.optim.batch_size

    def sync(self) -> None:
        """Wait for the device's queued work."""
        device_sync(self.device)()
