"""PNG plots of training runs: learning curves, image grids, reconstructions.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global
backend switch, no screen needed) and each PNG is written atomically, so a
crash mid-save never leaves a half-written image under the final name.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scg.training.checkpoint import atomic_write

__all__ = ["plot_curve", "plot_image_grid", "plot_reconstructions"]

_SIDE = 28  # MNIST images are 28x28
_PAD = 1  # pixels between images in a grid
_GAP_VALUE = 0.3  # light grey under the reversed colormap: visible between white backgrounds
_DPI = 100


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure: Figure, path: os.PathLike | str) -> None:
    with atomic_write(path) as f:
        figure.savefig(f, format="png")


def plot_curve(
    metrics: Sequence[dict[str, Any]],
    path: os.PathLike | str,
    *,
    series: Sequence[tuple[str, str]] = (("train_neg_elbo", "train"), ("test_neg_elbo", "test")),
    x_keys: Sequence[tuple[str, str]] = (("epoch", "epoch"), ("seconds", "seconds")),
    ylabel: str = "negative ELBO (nats)",
    title: str | None = None,
) -> None:
    """Plots learning curves against epoch and against wall-clock seconds (two panels).

    Args:
      metrics: one dict per evaluation, e.g. ``{"epoch": 3, "seconds": 41.2,
        "train_neg_elbo": 101.5, "test_neg_elbo": 103.0}``. A record lacking a
        series' key (say the test set was evaluated only every 10 epochs) is
        skipped for that series.
      path: the PNG to write.
      series: ``(metric key, legend label)`` pairs plotted as lines.
      x_keys: ``(metric key, axis label)`` for each panel's horizontal axis.
      ylabel: the vertical axis label.
      title: the figure title.

    Raises:
      ValueError: no record holds both an x key and a series key (the message
        lists the keys looked for and the keys found).
    """
    figure = _new_figure(5.0 * len(x_keys), 4.0)
    axes = figure.subplots(1, len(x_keys), squeeze=False)[0]
    drawn = 0
    for ax, (x_key, x_label) in zip(axes, x_keys):
        for y_key, label in series:
            points = [
                (float(m[x_key]), float(m[y_key]))
                for m in metrics
                if m.get(x_key) is not None and m.get(y_key) is not None
            ]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="." if len(points) < 50 else None, label=label)
                drawn += 1
        ax.set_xlabel(x_label)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
    if drawn == 0:
        found = sorted({k for m in metrics for k in m})
        raise ValueError(
            f"plot_curve: no metrics record holds both an x key {[k for k, _ in x_keys]} and "
            f"a series key {[k for k, _ in series]}; the records have keys {found}. "
            "Pass series=/x_keys= naming the keys your metrics use."
        )
    if title:
        figure.suptitle(title)
    _save_png(figure, path)


def _as_images(images: Any, what: str) -> np.ndarray:
    """(N, 28, 28) float array in [0, 1] from (N, 784) or (N, 28, 28), float or uint8."""
    array = np.asarray(images)
    if array.ndim == 2 and array.shape[1] == _SIDE * _SIDE:
        array = array.reshape(-1, _SIDE, _SIDE)
    if array.ndim != 3 or array.shape[1:] != (_SIDE, _SIDE):
        raise ValueError(
            f"{what}: expected images of shape (N, {_SIDE * _SIDE}) or (N, {_SIDE}, {_SIDE}), "
            f"got {array.shape}."
        )
    if array.shape[0] == 0:
        raise ValueError(f"{what}: got no images (shape {array.shape}).")
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) / 255.0  # uint8 pixels
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def _mosaic(images: np.ndarray, nrow: int) -> np.ndarray:
    """Tiles (N, 28, 28) images, ``nrow`` per row, into one array with light-grey gaps."""
    count = images.shape[0]
    rows = math.ceil(count / nrow)
    cell = _SIDE + _PAD
    mosaic = np.full((rows * cell + _PAD, nrow * cell + _PAD), _GAP_VALUE, dtype=np.float32)
    for index, image in enumerate(images):
        top, left = _PAD + (index // nrow) * cell, _PAD + (index % nrow) * cell
        mosaic[top : top + _SIDE, left : left + _SIDE] = image
    return mosaic


def _check_nrow(nrow: int, what: str) -> None:
    if not isinstance(nrow, (int, np.integer)) or nrow <= 0:
        raise ValueError(f"{what}: nrow (images per row) must be a positive int, got {nrow!r}.")


def _draw_grid(ax: Any, mosaic: np.ndarray, title: str | None) -> None:
    # Dark digits on white, as MNIST is usually shown in papers.
    ax.imshow(mosaic, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)


def plot_image_grid(
    images: Any,
    path: os.PathLike | str,
    *,
    nrow: int = 10,
    title: str | None = None,
) -> None:
    """Writes a grid of 28x28 images (e.g. samples from a model) as a PNG.

    Args:
      images: ``(N, 784)`` or ``(N, 28, 28)``; floats in ``[0, 1]`` (values
        outside are clipped) or integer pixels in ``0..255``.
      path: the PNG to write.
      nrow: images per row (as in ``torchvision.utils.make_grid``).
      title: the title above the grid.

    Raises:
      ValueError: the images have another shape, or ``nrow`` is not positive.
    """
    _check_nrow(nrow, "plot_image_grid")
    grid = _as_images(images, "plot_image_grid")
    mosaic = _mosaic(grid, min(nrow, grid.shape[0]))
    scale = 0.03  # inches per pixel: 28 px images show at ~0.85 in
    figure = _new_figure(
        max(2.0, mosaic.shape[1] * scale), max(2.0, mosaic.shape[0] * scale + (0.4 if title else 0))
    )
    _draw_grid(figure.subplots(), mosaic, title)
    _save_png(figure, path)


def plot_reconstructions(
    originals: Any,
    reconstructions: Any,
    path: os.PathLike | str,
    *,
    nrow: int = 10,
    title: str | None = None,
) -> None:
    """Writes originals (left panel) beside their reconstructions (right panel) as a PNG.

    Image ``i`` sits at the same grid position in both panels.

    Args:
      originals: ``(N, 784)`` or ``(N, 28, 28)`` images, as for ``plot_image_grid``.
      reconstructions: the same shape, e.g. decoder means for ``originals``.
      path: the PNG to write.
      nrow: images per row in each panel.
      title: the figure title.

    Raises:
      ValueError: shapes are not image batches or differ between the two.
    """
    _check_nrow(nrow, "plot_reconstructions")
    left = _as_images(originals, "plot_reconstructions (originals)")
    right = _as_images(reconstructions, "plot_reconstructions (reconstructions)")
    if left.shape != right.shape:
        raise ValueError(
            f"plot_reconstructions: {left.shape[0]} originals but {right.shape[0]} "
            "reconstructions; pass one reconstruction per original."
        )
    per_row = min(nrow, left.shape[0])
    mosaics = [_mosaic(left, per_row), _mosaic(right, per_row)]
    scale = 0.03
    height, width = mosaics[0].shape
    figure = _new_figure(max(4.0, 2 * width * scale + 0.3), max(2.0, height * scale + 0.6))
    for ax, mosaic, label in zip(figure.subplots(1, 2), mosaics, ("original", "reconstruction")):
        _draw_grid(ax, mosaic, label)
    if title:
        figure.suptitle(title)
    _save_png(figure, path)
