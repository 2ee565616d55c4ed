"""Training curves: read the ``metrics.csv`` a run writes and draw it to PNG."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence


def read(path: str | os.PathLike) -> dict[str, list[float]]:
    """Columns of a metrics.csv as float lists. ValueError naming the file when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metrics file not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise ValueError(f"{path}: not a metrics.csv (no 'step' column)")
        columns: dict[str, list[float]] = {name: [] for name in reader.fieldnames}
        for number, row in enumerate(reader, start=2):
            try:
                for name in columns:
                    columns[name].append(float(row[name]))
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{number}: unreadable row") from None
    if not columns["step"]:
        raise ValueError(f"{path}: no rows yet")
    return columns


def plot(path: str | os.PathLike, out: str | os.PathLike, metrics: Sequence[str] = ("loss",)) -> Path:
    """Draws ``metrics`` against step (raw, faint, and a moving average) into the PNG ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = read(path)
    missing = [m for m in metrics if m not in columns]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; has {sorted(columns)}")
    step = np.asarray(columns["step"])
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for name in metrics:
        y = np.asarray(columns[name])
        if not np.any(y):
            continue  # e.g. the AR loss of a run with ar_weight 0
        (line,) = ax.plot(step, y, alpha=0.25, linewidth=0.8)
        window = max(1, len(y) // 50)
        smooth = np.convolve(y, np.ones(window) / window, mode="valid")
        ax.plot(step[window - 1:], smooth, color=line.get_color(), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(Path(path).parent.name or str(path))
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
