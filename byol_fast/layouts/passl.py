"""Importer of the passl layout: not written yet (detect() never matches)."""
from __future__ import annotations

from . import Converted


def detect(obj: dict) -> bool:
    return False


def convert(obj: dict) -> Converted:
    raise NotImplementedError("passl")
