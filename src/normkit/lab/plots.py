"""Loss and accuracy curves of one or several runs as a PNG, drawn headless (matplotlib's Agg backend)."""

from __future__ import annotations

import io
import math
from pathlib import Path

from .data import atomic_write_bytes


def _values(history: list[dict], key: str) -> list[float]:
    # Absent measurements are None in metrics.json; matplotlib leaves a gap at NaN.
    return [math.nan if record[key] is None else record[key] for record in history]


def plot_curves(histories: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """One line per run: training (solid) and validation (dashed) loss and accuracy per epoch.

    ``histories`` maps a label (a norm name) to that run's per-epoch records (metrics.json's history).
    """
    import matplotlib
    matplotlib.use("Agg", force=True)  # no display on servers and CI
    from matplotlib import pyplot as plt

    from matplotlib.ticker import MaxNLocator

    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    markers = "osD^vP*X"
    for index, (label, history) in enumerate(histories.items()):
        # Distinct markers, shrinking with each run, keep identical curves (normkit vs torch.nn BN) both visible.
        style = dict(color=f"C{index % 10}", marker=markers[index % len(markers)],
                     markersize=max(3.0, 8.0 - 1.5 * index))
        epochs = [record["epoch"] for record in history]
        loss_axes.plot(epochs, _values(history, "loss"), **style, label=f"{label} train")
        accuracy_axes.plot(epochs, _values(history, "accuracy"), **style, label=f"{label} train")
        if any(r["val_loss"] is not None for r in history):  # --val-split 0: no validation curves
            loss_axes.plot(epochs, _values(history, "val_loss"), **style, linestyle="--", label=f"{label} validation")
            accuracy_axes.plot(epochs, _values(history, "val_accuracy"), **style, linestyle="--",
                               label=f"{label} validation")
    for axes, name in ((loss_axes, "cross-entropy loss"), (accuracy_axes, "accuracy")):
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(name)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path
