"""How a stage is timed: warm-up steps, a calibration that sizes the windows, then timed windows
of a fixed number of steps; a figure is the median over the windows with their min and max. On a
GPU each window ends with ``torch.cuda.synchronize()``. For a step fed by a loader, also the share of
each window the training step waited for its data."""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Iterable

import torch

from .progress import log


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one stage is timed: ``warmup`` untimed steps, then ``windows`` windows of about
    ``window_seconds`` each; ``deadline`` (time.monotonic(); None: no limit) is the stage's time box."""

    warmup: int
    windows: int
    window_seconds: float
    deadline: float | None = None


def device_sync(device: torch.device) -> Callable[[], None]:
    """What waits for the device's queued work: ``torch.cuda.synchronize`` on a GPU, nothing on the CPU."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def summary(rates: list[float]) -> dict:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "windows": rates}


def _collect(extras: dict, more: dict) -> None:
    for k, v in more.items():
        extras.setdefault(k, []).append(v)


def measure(step, images_per_step: int, sync, plan: Plan, label: str, on_window=None, rounds: int = 1) -> dict:
    """Warm up, calibrate a window's step count, then time ``plan.windows`` windows of ``step()``.

    ``on_window(seconds)`` (optional) is called after each window's sync and returns extra
    per-window figures (the data wait); they come back as lists under their own keys.

    ``rounds``: a DataLoader with N workers delivers batches in bursts of N (each worker builds
    a whole batch), so warm-up and calibration take a whole round of N steps and every window
    a whole number of rounds; otherwise a window would time batches prefetched before it began.

    ``plan.deadline``: the stage's time box. Windows are shortened so that all of them fit before
    it, and a window that would end after it is not started once one has been timed
    (``windows_cut_short``): a figure from fewer windows beats no figure.
    """
    warmup = plan.warmup + (rounds if rounds > 1 else 0)
    log(f"  warm-up: {warmup} steps")
    t = time.perf_counter()
    first = None
    for i in range(warmup):
        step()
        if i == 0:  # the first step builds what is lazy (cuDNN plans, torch.compile's graphs): its own figure
            sync()
            first = time.perf_counter() - t
    sync()
    warmup_seconds = time.perf_counter() - t
    if on_window:
        on_window(None)  # reset the counters the warm-up filled
    t = time.perf_counter()
    calib = max(2, rounds)
    for _ in range(calib):
        step()
    sync()
    calib_seconds = time.perf_counter() - t
    per_step = calib_seconds / calib
    windows, window_seconds, deadline = plan.windows, plan.window_seconds, plan.deadline
    steps = max(3, math.ceil(window_seconds / max(per_step, 1e-6)))
    steps = rounds * math.ceil(steps / rounds)
    rates, extras, cut = [], {}, False
    if deadline:  # shrink the windows (not their number) to what is left of the box, with a margin
        left = 0.9 * (deadline - time.monotonic()) - 1.0
        window_seconds = max(min(window_seconds, left / windows), 0.0)
        steps = rounds * math.ceil(max(3, math.ceil(window_seconds / max(per_step, 1e-6))) / rounds)
        if steps * per_step > left:
            # Not even one window fits: the calibration steps, timed like a window, are the figure
            # (one short window, flagged) rather than a stage that times out with none.
            log(f"  [{label}] no time left for a window: the {calib} calibration steps are the figure")
            rates.append(calib * images_per_step / calib_seconds)
            _collect(extras, on_window(calib_seconds) if on_window else {})
            windows, steps, cut = 0, calib, True
    log(f"  {per_step * 1e3:.1f} ms/step after warm-up ({warmup_seconds:.1f} s): {windows} windows of {steps} steps")
    if on_window and windows:
        on_window(None)  # reset the counters the calibration steps filled
    for w in range(windows):
        if deadline and rates and time.monotonic() + steps * per_step > deadline:
            log(f"  [{label}] {len(rates)} of {windows} windows: the stage's time box ends before another")
            cut = True
            break
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()  # host sync: the window's work is finished before the clock stops
        dt = time.perf_counter() - t0
        per_step = dt / steps
        rates.append(steps * images_per_step / dt)
        more = on_window(dt) if on_window else {}
        _collect(extras, more)
        note = "".join(f", {k} {v:.3f}" for k, v in more.items())
        log(f"  [{label}] window {w + 1}/{windows}: {rates[-1]:.1f} img/s{note}")
    out = {"img_per_s": summary(rates), "steps_per_window": steps, "warmup_steps": warmup,
           "warmup_seconds": warmup_seconds, "first_step_seconds": first,
           "step_ms": 1e3 * images_per_step / statistics.median(rates), "windows_cut_short": cut}
    for k, v in extras.items():
        out[k] = statistics.median(v)
        out[k + "_windows"] = v
    return out


def endless(loader: Iterable):
    """Batches from epoch after epoch of a loader."""
    while True:
        yield from loader


class DataWait:
    """Share of a window the training step waited for its data.

    On a GPU, CUDA events bracket each training step on its stream; the wait fraction is
    ``1 - (sum of step spans) / window time``, the share of the time the training stream had no step
    to run (loading, host-to-device copy; with it ``host_fetch_fraction``, the host's share of the
    window inside the loader). On the CPU, where everything is synchronous, it is the share of the
    time spent fetching and moving the batch.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self):
        self.events, self.host_wait = [], 0.0

    def fetched(self, seconds: float) -> None:
        self.host_wait += seconds

    def bracket(self):
        """A (start, end) pair of CUDA events to record around one step; None on the CPU."""
        if not self.cuda:
            return None
        pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        self.events.append(pair)
        return pair

    def window(self, seconds: float | None) -> dict:
        """The figures of a window that lasted ``seconds``; None resets the counters."""
        if seconds is None:
            self.reset()
            return {}
        out = {}
        if self.cuda:  # the events are complete: the window ended with a synchronize
            busy = sum(a.elapsed_time(b) for a, b in self.events) / 1e3
            wait = 1.0 - busy / seconds
            # The host's view beside the GPU's: the share of the window spent in next(loader) and the
            # copy. Not itself a wait of the GPU: the host queues steps ahead of it (Learner.step has
            # no host sync), so this time overlaps GPU work until the queue runs dry.
            out["host_fetch_fraction"] = _clamp(self.host_wait / seconds)
        else:
            wait = self.host_wait / seconds
        self.reset()
        return {"data_wait_fraction": _clamp(wait), **out}


def _clamp(x: float) -> float:
    return min(1.0, max(0.0, x))


def measure_fed(loader, move, train, images_per_step: int, device: torch.device, plan: Plan, label: str,
                rounds: int = 1) -> dict:
    """An end-to-end stage: each step takes the loader's next batch, moves it (``move``; host time, the
    data wait on the CPU) and runs ``train(batch)``, bracketed by CUDA events on a GPU."""
    stream, wait = endless(loader), DataWait(device)

    def step():
        t = time.perf_counter()
        batch = move(next(stream))
        wait.fetched(time.perf_counter() - t)
        events = wait.bracket()
        if events:
            events[0].record()
        train(batch)
        if events:
            events[1].record()

    try:
        return measure(step, images_per_step, device_sync(device), plan, label, on_window=wait.window, rounds=rounds)
    finally:
        stream.close()
