"""TensorBoard event files in a run's folder, written by the main process only."""
from __future__ import annotations


class Writer:
    """tensorboardX event files in the run folder; a no-op on ranks other than 0."""

    def __init__(self, log_dir: str, enabled: bool):
        self._w = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._w = SummaryWriter(log_dir)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._w is not None:
            for k, v in values.items():
                self._w.add_scalar(k, v, step)

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
