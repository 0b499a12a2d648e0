"""Tests of scg.training.plots: every plot writes a non-empty PNG atomically; bad input is refused."""

from __future__ import annotations

import os

import numpy as np
import pytest

from scg.training.plots import plot_curve, plot_image_grid, plot_reconstructions

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and data.endswith(b"IEND\xaeB`\x82")
    assert sorted(os.listdir(path.parent)) == [path.name]  # no temporary file left


def test_plot_curve(tmp_path):
    metrics = [
        {"epoch": e, "seconds": 2.0 * e, "train_neg_elbo": 200.0 / e, "test_neg_elbo": 210.0 / e if e % 2 else None}
        for e in range(1, 8)
    ]
    path = tmp_path / "curve.png"
    plot_curve(metrics, path, title="VAE on MNIST")
    assert_png(path)


def test_plot_curve_without_matching_keys(tmp_path):
    with pytest.raises(ValueError, match=r"no metrics record holds.*'train_neg_elbo'.*have keys \['epoch', 'loss'\]"):
        plot_curve([{"epoch": 1, "loss": 3.0}], tmp_path / "curve.png")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("shape", [(12, 784), (12, 28, 28)])
def test_plot_image_grid(tmp_path, shape):
    images = np.random.default_rng(0).random(shape, dtype=np.float32)
    path = tmp_path / "samples.png"
    plot_image_grid(images, path, nrow=5, title="samples")
    assert_png(path)


def test_plot_image_grid_uint8_and_bad_shape(tmp_path):
    plot_image_grid(np.zeros((3, 784), np.uint8), tmp_path / "g.png", nrow=10, title=None)
    assert_png(tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 784\) or \(N, 28, 28\), got \(3, 100\)"):
        plot_image_grid(np.zeros((3, 100)), tmp_path / "bad.png", nrow=2, title="x")
    with pytest.raises(ValueError, match=r"nrow \(images per row\) must be a positive int, got 0"):
        plot_image_grid(np.zeros((3, 784)), tmp_path / "bad.png", nrow=0, title="x")


def test_plot_reconstructions(tmp_path):
    rng = np.random.default_rng(1)
    originals = (rng.random((8, 784)) > 0.5).astype(np.float32)
    path = tmp_path / "recon.png"
    plot_reconstructions(originals, rng.random((8, 784)), path)
    assert_png(path)
    with pytest.raises(ValueError, match=r"8 originals but 7 reconstructions"):
        plot_reconstructions(originals, originals[:7], tmp_path / "bad.png")
