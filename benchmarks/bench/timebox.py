"""A stage's time box: its own ``timeout=`` (else ``--stage-timeout``), cut to what the run's
``--time-budget`` leaves it, and the alarm that ends a stage at the end of its box."""
from __future__ import annotations

import signal
import threading
import time

import torch

from .entries import parse_stage
from .settings import Settings

MIN_STAGE_SECONDS = 5.0  # less than this left: the stage is skipped rather than started


class StageTimeout(BaseException):
    """Raised in the main thread when a stage's time box ends. A BaseException, as KeyboardInterrupt
    is, so that library code catching Exception (torch.compile wraps its backends' errors) lets it
    through; where it is wrapped all the same, the alarm's ``fired`` flag still tells."""


class Alarm:
    """``with Alarm(seconds) as alarm:`` raises StageTimeout in the main thread after ``seconds``
    (SIGALRM; None or 0: never). Between Python bytecodes, so it ends a stage stuck in Python (a long
    torch.compile, a loader loop), not one inside a single C call that never returns:
    gpu_checks.sh's outer ``timeout`` is there for that. ``alarm.fired`` tells whether it rang."""

    def __init__(self, seconds: float | None):
        self.seconds, self.fired, self._previous = seconds, False, None
        self._armed = bool(seconds) and hasattr(signal, "setitimer") and \
            threading.current_thread() is threading.main_thread()

    def _ring(self, signum, frame):
        self.fired = True
        # Again in a second, and every second after: the signal may land in a weakref callback or a
        # __del__, where Python prints the exception and carries on ("Exception ignored in ...").
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        raise StageTimeout(self.seconds)

    def __enter__(self) -> Alarm:
        if self._armed:
            self._previous = signal.signal(signal.SIGALRM, self._ring)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc) -> bool:
        if self._armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
        return False


def own_timeout(settings: Settings, key: str) -> float | str | None:
    """Stage ``key``'s own box: its ``timeout=`` (seconds or ``rest``), else ``--stage-timeout``."""
    return parse_stage(key).options.get("timeout", settings.stage_timeout)


def time_box(settings: Settings, key: str, budget_end: float | None) -> float | None:
    """Seconds stage ``key`` may run: its own box, cut, when the run has a ``--time-budget`` (ending
    at ``budget_end``, time.monotonic()), to what the budget leaves after reserving
    ``--stage-reserve`` seconds (or their own box, if smaller) for each stage after it;
    ``timeout=rest`` takes all that is left and reserves nothing. None: no limit."""
    mine = own_timeout(settings, key)
    if settings.time_budget is None:
        return None if mine in (None, "rest") else mine
    reserve = 0.0
    for later in settings.stages[settings.stages.index(key) + 1:]:
        theirs = own_timeout(settings, later)
        reserve += 0.0 if theirs == "rest" else min(settings.stage_reserve, theirs or settings.stage_reserve)
    left = budget_end - time.monotonic() - reserve
    return left if mine in (None, "rest") else min(mine, left)


def is_oom(e: BaseException | None) -> bool:
    """A CUDA out-of-memory error, also when torch.compile or a loader wrapped it."""
    while e is not None:
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False
