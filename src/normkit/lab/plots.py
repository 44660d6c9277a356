"""Loss and accuracy curves of one or several runs as a PNG, drawn headless (matplotlib's Agg backend)."""

from __future__ import annotations

import io
from pathlib import Path

from .data import atomic_write_bytes


def plot_curves(histories: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """One line per run: training (solid) and validation (dashed) loss and accuracy per epoch.

    ``histories`` maps a label (a norm name) to that run's per-epoch records (metrics.json's history).
    """
    import matplotlib
    matplotlib.use("Agg", force=True)  # no display on servers and CI
    from matplotlib import pyplot as plt

    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for index, (label, history) in enumerate(histories.items()):
        color = f"C{index % 10}"
        epochs = [record["epoch"] for record in history]
        loss_axes.plot(epochs, [r["loss"] for r in history], color=color, marker="o", label=f"{label} train")
        loss_axes.plot(epochs, [r["val_loss"] for r in history], color=color, marker="o", linestyle="--",
                       label=f"{label} validation")
        accuracy_axes.plot(epochs, [r["accuracy"] for r in history], color=color, marker="o", label=f"{label} train")
        accuracy_axes.plot(epochs, [r["val_accuracy"] for r in history], color=color, marker="o", linestyle="--",
                           label=f"{label} validation")
    for axes, name in ((loss_axes, "cross-entropy loss"), (accuracy_axes, "accuracy")):
        axes.set_xlabel("epoch")
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
