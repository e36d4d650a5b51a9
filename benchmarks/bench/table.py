"""Reading the stages of a throughput result and writing Markdown tables of them, shared by the
benchmark's report (:mod:`bench.report`) and the GPU suite's closing table (``benchmarks/gpu_table.py``).

A result's ``stages`` maps each ``--stages`` entry (``model``, ``model:batch=512``, ...) to its record:
``stage`` (the stage's name), ``img_per_s`` (``median``, ``min``, ``max``; None when not measured),
``step`` (a BYOL step's signature) and the rest. Standard library only, so that gpu_table.py runs
whatever the state of the machine.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence


def rate(st: dict | None) -> float | None:
    """A stage's median img/s; None when it has no figure."""
    return st["img_per_s"]["median"] if st and st.get("img_per_s") else None


def best_stage(stages: dict, name: str, where: Callable[[dict], bool] | None = None) -> str | None:
    """The key of the fastest measured variant of stage ``name`` (``model``, ``model:batch=512``, ...)
    among those ``where`` accepts."""
    keys = [k for k, st in stages.items()
            if st.get("stage", k.split(":")[0]) == name and rate(st) and (where is None or where(st))]
    return max(keys, key=lambda k: rate(stages[k]), default=None)


def best_rate(stages: dict, name: str, where: Callable[[dict], bool] | None = None) -> float | None:
    """The median img/s of :func:`best_stage`; None when no variant was measured."""
    return rate(stages.get(best_stage(stages, name, where) or ""))


def describe_step(step: dict | None) -> str:
    """A BYOL step's signature in words: ``resnet50 224 px, batch 256, compile default, bfloat16``."""
    if not step:
        return ""
    return (f"{step['backbone']} {step['image_size']} px, batch {step['batch']}, "
            f"{'compile ' + step['compile'] if step['compile'] else 'eager'}, {step['precision']}")


def fmt(x: float | None, spec: str) -> str:
    """``x`` in the format ``spec``; ``-`` when missing."""
    return "-" if x is None else format(x, spec)


def numbers(figures: dict, spec: str) -> str:
    """The numeric entries of ``figures`` as ``key value, ...`` (floats in the format ``spec``)."""
    return ", ".join(f"{k} {v:{spec}}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()
                     if isinstance(v, (int, float)))


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    """The lines of a Markdown table: the header, the alignment row (columns ``right`` right-aligned)
    and one line per row of cells."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    return [line(head), "|" + "|".join("---:" if i in right else "---" for i in range(len(head))) + "|",
            *(line(cells) for cells in rows)]
