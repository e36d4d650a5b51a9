"""Facts about the machine a run measures: device and software versions, the load average (other
work on the machine shows up there) and the peak resident memory of the process tree."""
from __future__ import annotations

import os
import platform
import resource
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import PIL
import torch
import torchvision
from PIL import features

from byol_fast.runtime.process import git_revision

try:  # optional: without DALI the record says why and the torchvision stages still run
    import nvidia.dali

    DALI_VERSION = nvidia.dali.__version__
except ImportError as e:
    DALI_VERSION = f"not importable: {e}"


def environment(device: torch.device) -> dict:
    """Device name and software versions."""
    env = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "pillow": PIL.__version__,
           "pillow_libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
           "cpu": cpu_name(), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "dali": DALI_VERSION}
    try:
        env["git"] = git_revision()
    except Exception:  # noqa: BLE001  the revision is a label, never a reason to stop
        env["git"] = "unknown"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   gpu_capability=f"{props.major}.{props.minor}")
    return env


def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine shows up here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (DataLoader workers); shared pages count once per process."""
    total, todo = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


class HostPeak:
    """Peak resident memory of this process tree while the ``with`` block runs, sampled every 0.1 s."""

    def __enter__(self):
        self.peak, self._stop, self._lock, self._round = 0, threading.Event(), threading.Lock(), 0
        self._ok = Path(f"/proc/{os.getpid()}/statm").exists()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._ok:
            started, rss = self._round, tree_rss(os.getpid())
            with self._lock:
                if started == self._round:  # not a sample taken before a restart
                    self.peak = max(self.peak, rss)
            if self._stop.wait(0.1):
                break

    def restart(self) -> int:
        """The peak so far; from here on the peak starts again from the present resident memory, so
        that a stage's set-up (the packing of the shards stage) stays out of its figure."""
        now = tree_rss(os.getpid()) if self._ok else 0
        with self._lock:
            peak, self.peak, self._round = max(self.peak, now), now, self._round + 1
        return peak

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if not self._ok:  # no /proc: the process's lifetime peak (ru_maxrss, KiB on Linux, bytes on macOS)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak = rss if sys.platform == "darwin" else rss * 1024
        return False
