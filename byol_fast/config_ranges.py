"""The one table of ranges of every number field of a config, and its check.

A field of a name in :data:`RANGES`, in any section of any schema, must lie in that interval; a
pair named in :data:`ORDERED` must also be a (min, max) range. Read by ``byol_fast.config`` when a
config is built, so every command, file and override gets the same bounds."""
from __future__ import annotations

import dataclasses
import math
import re

from byol_fast.errors import ConfigError


# The one table of ranges: a number field of this name, in any section of any schema, lies in this
# interval (every element of a tuple does). Written ">= a", "> a" (up to, not including, infinity) or
# "[a, b]" with ( ) for open ends: an end is infinite only where written "inf", so NaN and infinities
# are refused everywhere else. Every int and float field has an entry (tests/test_config.py checks).
RANGES = {
    # counts and sizes: at least one
    "image_size": ">= 1", "resize": ">= 1", "batch_size": ">= 1", "accumulate": ">= 1", "epochs": ">= 1",
    "log_every": ">= 1", "prefetch": ">= 1", "knn_k": ">= 1", "blur_kernel": ">= 1",
    "max_nonfinite_steps": ">= 1", "projector_hidden": ">= 1", "projector_out": ">= 1",
    "predictor_hidden": ">= 1", "pixel_hidden": ">= 1", "pixel_out": ">= 1",
    # counts where 0 means "off", "all" or (num_threads, torchvision's DataLoader) "in the main process"
    "max_steps": ">= 0", "index_workers": ">= 0", "knn_every": ">= 0", "knn_bank_limit": ">= 0", "holdout": ">= 0",
    "num_threads": ">= 0", "seed": ">= 0", "start_image_size": ">= 0", "ramp_start_epoch": ">= 0",
    "ramp_end_epoch": ">= 0",
    # probabilities and fractions
    "flip_p": "[0, 1]", "jitter_p": "[0, 1]", "grayscale_p": "[0, 1]", "blur_p": "[0, 1]", "solarize_p": "[0, 1]",
    "solarize_threshold": "[0, 1]", "hw_decoder_load": "[0, 1]", "tau_base": "[0, 1]", "momentum": "[0, 1)",
    "crop_area": "(0, 1]", "label_fraction": "(0, 1]", "mean": "[0, 1]",
    # strengths, rates and scales
    "brightness": ">= 0", "contrast": ">= 0", "saturation": ">= 0", "hue": "[0, 0.5]",
    "crop_aspect": "> 0", "blur_sigma": "> 0", "std": "> 0",
    "lr": ">= 0", "probe_lr": ">= 0", "weight_decay": ">= 0", "eta": ">= 0", "warmup_epochs": ">= 0",
    "instance_weight": ">= 0", "pixpro_weight": ">= 0", "pixpro_gamma": ">= 0", "pixpro_threshold": "> 0",
    "knn_temperature": "(-inf, inf)",  # <= 0: plain majority votes
    "checkpoint_minutes": "[0, inf]",  # inf: only at epoch ends and on a stop signal
}


# Pairs (min, max) of RANGES fields: the first may not exceed the second.
ORDERED = {"crop_area", "crop_aspect", "blur_sigma"}


_RANGE = re.compile(r"(?P<op>>=?) (?P<lo>\S+)|(?P<left>[\[(])(?P<a>[^,]+), (?P<b>[^\])]+)(?P<right>[\])])")


def interval(spec: str) -> tuple[float, float, bool, bool]:
    """A RANGES entry as (low end, high end, low end included, high end included)."""
    m = _RANGE.fullmatch(spec)
    if m["op"]:
        return float(m["lo"]), math.inf, m["op"] == ">=", False
    return float(m["a"]), float(m["b"]), m["left"] == "[", m["right"] == "]"


def _in_range(value: float, spec: str) -> bool:
    """Whether ``value`` lies in the interval ``spec``; NaN never does."""
    lo, hi, lo_in, hi_in = interval(spec)
    return (value >= lo if lo_in else value > lo) and (value <= hi if hi_in else value < hi)


def check_ranges(obj, prefix: str) -> None:
    """Every number field of ``obj`` in its RANGES interval, and the (min, max) pairs in order."""
    for f in dataclasses.fields(obj):
        if f.name not in RANGES:
            continue
        spec, value = RANGES[f.name], getattr(obj, f.name)
        bound = "a finite number" if spec == "(-inf, inf)" else spec if spec[0] == ">" else f"in {spec}"
        items = [(f"[{i}]", v) for i, v in enumerate(value)] if isinstance(value, tuple) else [("", value)]
        for index, v in items:
            if not _in_range(v, spec):
                raise ConfigError(f"{prefix}{f.name}{index}: must be {bound}, got {v!r}")
        if f.name in ORDERED and value[0] > value[1]:
            raise ConfigError(f"{prefix}{f.name}: {list(value)} is not a range min <= max")
