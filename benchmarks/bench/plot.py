"""The run's bar chart (``--plot``): median img/s per stage with min-max whiskers; the public anchors
in grey on a GPU."""
from __future__ import annotations

from .entries import LABELS
from .targets import PEERS

COLOURS = {"dali": "#1f77b4", "shards": "#17becf", "torchvision": "#9ecae1", "model": "#ff7f0e",
           "e2e-dali": "#2ca02c", "e2e-torchvision": "#98df8a", "linear": "#9467bd", "e2e-linear": "#c5b0d5"}


def _bars(result: dict) -> tuple[list[str], list[float], list[float], list[float], list[str]]:
    """Names, medians, whiskers below and above, and colours of the bars, top to bottom."""
    names, med, lo, hi, cols = [], [], [], [], []
    for key, st in result["stages"].items():
        name = st.get("stage", key)
        if name == "checkpoint":
            continue
        r = st.get("img_per_s")
        variant = key.partition(":")[2].replace(":", ", ")
        names.append(LABELS[name] + (f" ({variant})" if variant else "")
                     + ("" if r else f" ({st.get('status', 'failed')})"))
        med.append(r["median"] if r else 0.0)
        lo.append(r["median"] - r["min"] if r else 0.0)
        hi.append(r["max"] - r["median"] if r else 0.0)
        cols.append(COLOURS.get(name, "#7f7f7f"))
    if result["settings"]["device"] == "cuda":
        for label, value in PEERS.items():
            names.append(label)
            med.append(value), lo.append(0.0), hi.append(0.0), cols.append("#bbbbbb")
    return names, med, lo, hi, cols


def plot(result: dict, path: str) -> None:
    """Writes the chart of ``result`` to ``path`` (PNG)."""
    # Imported here: matplotlib takes a noticeable moment to import and only --plot needs it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, med, lo, hi, cols = _bars(result)
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(names) + 1.6))
    y = list(range(len(names)))[::-1]
    ax.barh(y, med, xerr=[lo, hi], color=cols, capsize=3)
    for yi, m, h in zip(y, med, hi):
        ax.text(m + h, yi, f"  {m:,.0f}", va="center", fontsize=9)
    ax.set_yticks(y, names)
    ax.set_xlabel("images / s (median of timed windows; whiskers: min-max)")
    env, cfg = result["environment"], result["config"]
    ax.set_title(f"{env.get('gpu') or 'CPU, ' + str(result['settings']['cores']) + ' cores'}: "
                 f"{cfg['model']['backbone']} {cfg['data']['image_size']}px, batch {result['settings']['batch']}",
                 fontsize=10)
    ax.set_xlim(0, max(med + [1.0]) * 1.18)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
