"""Figures shared by the command line and the notebooks (matplotlib, Agg backend safe)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def matrix_heatmap(results: dict, key: str = "bpb_matrix", ax=None, title: str | None = None):
    """Annotated stage x domain heatmap of `results[key]` (lower is better, so the colour map is reversed)."""
    matrix = np.asarray(results[key], dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.4 * matrix.shape[1] + 2.5, 0.55 * matrix.shape[0] + 1.8))
    image = ax.imshow(matrix, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(matrix.shape[1]), results["domains"], rotation=30, ha="right")
    ax.set_yticks(range(matrix.shape[0]), results["stages"])
    ax.set_xlabel("evaluated domain")
    ax.set_ylabel("stage")
    unit = "bits/byte" if key.startswith("bpb") else "nats/token"
    ax.set_title(title or f"test loss ({unit})")
    spread = np.nanmax(matrix) - np.nanmin(matrix)
    for (i, j), value in np.ndenumerate(matrix):
        light = value > np.nanmin(matrix) + 0.5 * spread  # light cells for high loss in viridis_r
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="black" if light else "white")
    ax.figure.colorbar(image, ax=ax, label=unit)
    return ax


def save_matrix_heatmap(results: dict, path: str | Path, key: str = "bpb_matrix") -> Path:
    ax = matrix_heatmap(results, key)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=120)
    plt.close(ax.figure)
    return Path(path)
